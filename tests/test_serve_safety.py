"""The server's safety, isolation and metrics, through real HTTP (uvicorn on a loopback port, the
official `openai` client and raw `httpx`): refused local paths that all look alike, the API key,
the Origin check and CORS, bytes in flight, stop-string caps, one failing request among healthy
ones, a dead engine thread, deadlines, keep-alive comments, X-Request-Id, draining and /metrics.
The model is the small real export in tests/fixtures."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from vlm.serve.engines import build_engine
from vlm.serve.media_urls import PATH_REFUSED, MediaPolicy
from vlm.serve.server import ServerOptions, create_app, draining_server, exposure_warning

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"
PNG = (FIXTURE / "circle.png").read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def loaded():
    from vlm.checkpoint.load import load_checkpoint

    return load_checkpoint(FIXTURE / "export")


class Server:
    def __init__(self, engine, app, url: str, srv):
        self.engine, self.app, self.url, self.srv = engine, app, url, srv

    def client(self, key: str = "unused", **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def post(self, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        kw.setdefault("timeout", 60)
        return httpx.post(f"{self.url}/v1/chat/completions", content=content, **kw)

    def wait_idle(self, timeout: float = 20) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            s = self.engine.stats()
            busy = s["running"] or s.get("prefilling", 0) or s["queue_depth"]
            if not busy and s.get("free_slots") == s.get("max_batch"):  # a row between queue and slot holds one
                return s
            time.sleep(0.02)
        raise AssertionError(f"engine still busy: {self.engine.stats()}")


@contextlib.contextmanager
def serving(loaded, kind: str = "continuous", drain_s: float | None = None, engine_opts=None, **options):
    opts = {"kind": kind, "max_queue": 8, **(engine_opts or {})}
    if kind == "continuous":
        opts.setdefault("max_batch", 4)
    engine = build_engine(loaded, opts, dtype="fp32", model_name="tiny")
    options.setdefault("default_max_tokens", 8)
    options.setdefault("poll_s", 0.05)
    app = create_app(engine, ServerOptions(**options))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=drain_s)
    srv = draining_server(app, config)
    with engine:
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        t0 = time.time()
        while not srv.started:
            assert time.time() - t0 < 30 and thread.is_alive(), "server did not start"
            time.sleep(0.02)
        try:
            yield Server(engine, app, f"http://127.0.0.1:{port}", srv)
        finally:
            srv.should_exit = True
            thread.join(15)


def _messages(url: str = DATA_URL, text: str = "What color is the circle?") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def _slow_steps(monkeypatch, engine, seconds: float) -> None:
    """Each engine step (or serial request token) takes at least `seconds` longer."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        step()

    monkeypatch.setattr(engine, "step", slow)


# ---- local media ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("tree")
    root, outside = base / "media", base / "private"
    root.mkdir()
    outside.mkdir()
    (root / "circle.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (root / "sub").mkdir()
    (root / "escape.png").symlink_to(outside / "secret.png")  # a link that leads outside
    return root, outside


def test_every_refused_path_gets_the_same_answer(loaded, media_tree):
    root, outside = media_tree
    answers = []
    with serving(loaded, media=MediaPolicy(media_root=str(root), local_media=True)) as s:
        ok = s.post({"messages": _messages("circle.png"), "max_tokens": 2})
        assert ok.status_code == 200, ok.text  # inside the folder: read
        for url in (
            str(outside / "secret.png"),  # exists, outside
            str(outside / "missing.png"),  # missing, outside
            "missing.png",  # missing, inside
            "escape.png",  # a symlink inside that points outside
            "../private/secret.png",  # a way out by ..
            f"file://{outside / 'secret.png'}",
            "sub",  # a directory
            "/etc/passwd",
        ):
            r = s.post({"messages": _messages(url), "max_tokens": 2})
            answers.append((r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]))
    with serving(loaded) as s:  # the default: no media folder, no local files at all
        for url in (str(root / "circle.png"), str(outside / "missing.png")):
            r = s.post({"messages": _messages(url), "max_tokens": 2})
            answers.append((r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]))
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model="tiny", messages=_messages(str(root / "circle.png")))
        assert e.value.code == PATH_REFUSED
    assert len(set(answers)) == 1, answers
    assert answers[0][:2] == (400, PATH_REFUSED)
    assert str(outside) not in answers[0][2]


# ---- API key, Origin, CORS, the exposure warning -------------------------------------------------------
def test_api_key(loaded, caplog):
    with serving(loaded, api_key=KEY) as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").chat.completions.create(model="tiny", messages=_messages(), max_tokens=2)
        r = s.post({"messages": _messages(), "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        answer = s.client(KEY).chat.completions.create(model="tiny", messages=_messages(), max_tokens=2)
        assert answer.choices[0].finish_reason in ("length", "stop")
        assert [m.id for m in s.client(KEY).models.list().data] == ["tiny"]
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key
        assert KEY not in repr(s.app.state) and KEY not in repr(ServerOptions(api_key=KEY))
    assert KEY not in caplog.text


def test_api_key_from_the_environment(monkeypatch):
    from omegaconf import OmegaConf

    from vlm.serve.server import options_from

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "serve.yaml")
    monkeypatch.delenv("VLM_API_KEY", raising=False)
    assert options_from(cfg).api_key is None
    assert options_from(cfg).media.local_media is False  # safe by default
    monkeypatch.setenv("VLM_API_KEY", KEY)
    assert options_from(cfg).api_key == KEY
    cfg.api_key = "from-config"
    assert options_from(cfg).api_key == "from-config"


def test_exposure_warning():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert exposure_warning(host, None) is None, host
    assert exposure_warning("::", None) and exposure_warning("my-host.example", None)
    assert exposure_warning("0.0.0.0", KEY) is None
    warning = exposure_warning("0.0.0.0", None)
    assert warning and "\n" not in warning and "API key" in warning


def test_browser_origins_are_refused_unless_listed(loaded):
    body = {"messages": _messages(), "max_tokens": 2}
    with serving(loaded) as s:
        r = s.post(body, headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
        assert s.post(body).status_code == 200  # no Origin: not a browser
    with serving(loaded, cors_origins=["https://app.example"]) as s:
        pre = httpx.options(
            f"{s.url}/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        r = s.post(body, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert s.post(body, headers={"Origin": "http://evil.example"}).status_code == 403


def test_a_loopback_server_answers_only_loopback_host_names(loaded):
    """DNS rebinding: a page whose own name now resolves to 127.0.0.1 sends `Host: evil.example`."""
    from omegaconf import OmegaConf

    from vlm.serve.server import _host_name, allowed_hosts_from

    assert [_host_name(h) for h in ("127.0.0.1:8000", "[::1]:80", "LocalHost", "::1")] == [
        "127.0.0.1",
        "::1",
        "localhost",
        "::1",
    ]
    assert allowed_hosts_from(OmegaConf.create({"host": "0.0.0.0"})) is None
    assert "127.0.0.2" in allowed_hosts_from(OmegaConf.create({"host": "127.0.0.2"}))
    assert allowed_hosts_from(OmegaConf.create({"host": "0.0.0.0", "allowed_hosts": ["vlm.internal"]})) == [
        "vlm.internal"
    ]
    hosts = allowed_hosts_from(OmegaConf.create({"host": "127.0.0.1"}))
    body = {"messages": _messages(), "max_tokens": 2}
    with serving(loaded, allowed_hosts=hosts) as s:
        assert s.post(body).status_code == 200  # Host: 127.0.0.1:PORT
        assert httpx.get(f"{s.url}/health", headers={"Host": "localhost"}).status_code == 200
        for evil in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = httpx.get(f"{s.url}/v1/models", headers={"Host": evil})
            assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", evil


# ---- requests that must not hurt the others ---------------------------------------------------------
def test_a_slow_large_upload_does_not_delay_another_stream(loaded):
    """One client trickles a 4 MB body and stops halfway until another client's stream has ended:
    the stream must run to its end while the upload is still open."""
    stream_done = threading.Event()
    uploaded_all = threading.Event()
    pad = "x" * (4 << 20)
    body = json.dumps({"messages": _messages(), "max_tokens": 2, "user": pad}).encode()
    result = {}

    def trickle():
        step = 64 << 10
        for i in range(0, len(body), step):
            if i >= len(body) // 2 and not stream_done.is_set():
                stream_done.wait(60)  # hold the upload open until the other stream ends
            yield body[i : i + step]
            time.sleep(0.002)
        uploaded_all.set()

    with serving(loaded, max_body_bytes=8 << 20) as s:

        def upload():
            result["upload"] = httpx.post(f"{s.url}/v1/chat/completions", content=trickle(), timeout=120)

        t = threading.Thread(target=upload)
        t.start()
        time.sleep(0.2)  # the upload is under way
        stream = s.client().chat.completions.create(
            model="tiny", messages=_messages(), max_tokens=12, temperature=0, stream=True
        )
        chunks = [c for c in stream if c.choices]
        assert not uploaded_all.is_set(), "the stream waited for the slow upload"
        stream_done.set()
        t.join(120)
    assert any(c.choices[0].delta.content for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    assert result["upload"].status_code == 200, result["upload"].text


def test_bytes_in_flight_are_bounded(loaded):
    """A body that would take the bytes in flight over the cap gets 503 + Retry-After before it is read."""
    release = threading.Event()
    body = json.dumps({"messages": _messages(), "max_tokens": 2, "user": "x" * (600 << 10)}).encode()
    result = {}

    def slow():
        yield body[:1000]
        release.wait(60)
        yield body[1000:]

    with serving(loaded, max_body_bytes=2 << 20, max_inflight_bytes=1 << 20) as s:
        headers = {"Content-Length": str(len(body))}

        def upload():
            result["slow"] = httpx.post(f"{s.url}/v1/chat/completions", content=slow(), headers=headers, timeout=60)

        t = threading.Thread(target=upload)
        t.start()
        try:
            t0 = time.time()
            while s.app.state.inflight.used < len(body):  # until the slow one holds its share
                assert time.time() - t0 < 20, "the slow upload never started"
                time.sleep(0.02)
            r = s.post(body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "server_busy"
            assert s.post({"messages": _messages(), "max_tokens": 2}).status_code == 200  # small ones fit
        finally:
            release.set()
            t.join(60)
        assert result["slow"].status_code == 200
        assert s.post(body).status_code == 200  # the share came back


def test_stop_strings_are_capped_in_length(loaded):
    from vlm.serve.openai_protocol import MAX_STOP, MAX_STOP_CHARS

    with serving(loaded) as s:
        c = s.client()
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=_messages(), max_tokens=2, stop="z" * (MAX_STOP_CHARS + 1))
        assert e.value.code == "invalid_value" and e.value.param == "stop"
        r = s.post({"messages": _messages(), "stop": ["q"] * MAX_STOP + ["z" * 100_000]})
        assert r.status_code == 400
        at_cap = [chr(0x41 + i) * MAX_STOP_CHARS for i in range(MAX_STOP)]
        ok = c.chat.completions.create(model="tiny", messages=_messages(), max_tokens=4, stop=at_cap, temperature=0)
        assert ok.choices[0].finish_reason in ("length", "stop")


def _texts(messages) -> str:
    return " ".join(p.get("text", "") for m in messages for p in m["content"] if isinstance(p, dict))


def _run_beside(s, marked: str, n_good: int = 2, max_tokens: int = 12):
    """n_good normal streams and one whose prompt carries `marked`, at once: (good results, bad error)."""
    out, errors = {}, {}

    def ask(i, text):
        try:
            stream = s.client().chat.completions.create(
                model="tiny", messages=_messages(text=text), max_tokens=max_tokens, temperature=0, stream=True
            )
            chunks = list(stream)
            out[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1])
        except openai.APIError as e:
            errors[i] = e

    threads = [threading.Thread(target=ask, args=(i, "What color?")) for i in range(n_good)]
    threads.append(threading.Thread(target=ask, args=(n_good, f"What color? {marked}")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out, errors


def test_an_exception_in_one_row_fails_that_row_only(loaded, monkeypatch):
    import vlm.serve.engine as engine_module
    from vlm.serve.row import Row

    real_inputs, real_push = engine_module.row_inputs, Row.push

    def inputs(model, prompt, *a, **kw):  # the vision encoder running out of memory for one request
        if "ENCODE-BOOM" in loaded.tokenizer.decode(prompt.input_ids.tolist()):
            raise RuntimeError("CUDA out of memory (injected)")
        return real_inputs(model, prompt, *a, **kw)

    def push(self, tok, *a, **kw):  # a failure while handling one row's third token
        if "DECODE-BOOM" in _texts(self.request.messages) and len(self.out) >= 2:
            raise RuntimeError("injected")
        return real_push(self, tok, *a, **kw)

    monkeypatch.setattr(engine_module, "row_inputs", inputs)
    monkeypatch.setattr(Row, "push", push)
    with serving(loaded) as s:
        _slow_steps(monkeypatch, s.engine, 0.01)  # keep the three requests side by side
        for marker in ("ENCODE-BOOM", "DECODE-BOOM"):
            out, errors = _run_beside(s, marker)
            assert sorted(out) == [0, 1] and list(errors) == [2], (out, errors)
            assert all(fin.choices[0].finish_reason == "length" for _, fin in out.values())
            assert out[0][0] == out[1][0]  # greedy, same prompt
            assert "internal error" in str(errors[2])
            idle = s.wait_idle()
            assert idle["free_slots"] == idle["max_batch"] and idle["alive"]
        assert httpx.get(f"{s.url}/health").status_code == 200


def test_a_failing_batched_decode_step_is_retried_row_by_row(loaded, monkeypatch):
    with serving(loaded, default_max_tokens=10) as s:
        alone = s.client().chat.completions.create(
            model="tiny", messages=_messages(text="What color?"), temperature=0, max_tokens=10
        )
        model = s.engine.model
        forward = model.forward

        def flaky(tokens, *a, **kw):  # every batched decode step fails: the rows run alone
            if tokens.shape[0] > 1:
                raise RuntimeError("out of memory (injected)")
            return forward(tokens, *a, **kw)

        monkeypatch.setattr(model, "forward", flaky)
        _slow_steps(monkeypatch, s.engine, 0.01)
        out, errors = _run_beside(s, "", n_good=2, max_tokens=10)
        assert not errors and len(out) == 3
        for i in (0, 1):  # the same greedy answer as without the failures
            assert out[i][0] == alone.choices[0].message.content
            assert out[i][1].choices[0].finish_reason == "length"
        assert s.wait_idle()["errors"] == 0


def test_a_failing_packed_prefill_is_retried_row_by_row(loaded, monkeypatch):
    """Several rows' prefill chunks run as one forward (`PackedPrefill`); when it fails, each row's
    chunk runs alone and the answers are the ones the rows get without the failure."""
    from vlm.serve.kv_slots import PackedPrefill

    with serving(loaded, engine_opts={"prefill_groups": 1}, default_max_tokens=6) as s:  # all in one step
        alone = s.client().chat.completions.create(
            model="tiny", messages=_messages(text="What color?"), temperature=0, max_tokens=6
        )
        model = s.engine.model
        forward, failed = model.forward, []

        def flaky(*a, cache=None, **kw):
            if isinstance(cache, PackedPrefill):
                failed.append(len(cache.segments))
                raise RuntimeError("out of memory (injected)")
            return forward(*a, cache=cache, **kw)

        monkeypatch.setattr(model, "forward", flaky)
        _slow_steps(monkeypatch, s.engine, 0.05)  # let the three requests arrive before a step takes them
        out, errors = _run_beside(s, "", n_good=2, max_tokens=6)
        assert not errors and len(out) == 3
        for i in (0, 1):  # the same prompt as `alone` (the third has a marker after it)
            assert out[i][0] == alone.choices[0].message.content
        assert failed and max(failed) > 1
        assert s.wait_idle()["errors"] == 0


def test_an_admission_failure_ends_its_request_and_frees_the_slot(loaded, monkeypatch):
    with serving(loaded) as s:
        c = s.client()
        c.chat.completions.create(model="tiny", messages=_messages(), max_tokens=4, temperature=0)
        s.wait_idle()

        def broken(*a, **kw):
            raise RuntimeError("copy failed (injected)")

        monkeypatch.setattr(s.engine.slots, "write", broken)  # the cached prefix cannot be copied in
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="tiny", messages=_messages(), max_tokens=4, temperature=0)
        idle = s.wait_idle()
        assert idle["free_slots"] == idle["max_batch"] and idle["errors"] >= 1
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("length", "stop")


class _Die(BaseException):
    """Not an Exception: nothing in the engine catches it, the thread dies."""


@pytest.mark.parametrize("kind", ["continuous", "serial"])
def test_a_dead_engine_thread_turns_health_to_503(loaded, monkeypatch, kind):
    with serving(loaded, kind=kind) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200

        def die(*a, **kw):
            raise _Die

        monkeypatch.setattr(s.engine, "step" if kind == "continuous" else "_run", die)
        r = s.post({"messages": _messages(), "max_tokens": 4})  # the request the thread dies on
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
        t0 = time.time()
        while s.engine.alive and time.time() - t0 < 10:
            time.sleep(0.02)
        h = httpx.get(f"{s.url}/health")
        assert h.status_code == 503 and h.json()["status"] == "engine_stopped"
        r = s.post({"messages": _messages(), "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
        metrics = httpx.get(f"{s.url}/metrics").text
        assert "vlm_engine_alive 0.0" in metrics


# ---- deadlines, keep-alive, request ids, draining -------------------------------------------------
def test_a_request_past_its_deadline_ends_and_frees_its_slot(loaded, monkeypatch):
    with serving(loaded, request_timeout_s=0.5) as s:
        _slow_steps(monkeypatch, s.engine, 0.02)
        r = s.post({"messages": _messages(), "max_tokens": 400, "temperature": 0})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        body = {"messages": _messages(), "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as resp:
            lines = [x for x in resp.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout", lines[-3:]
        with pytest.raises(openai.APIError, match="limit"):
            list(
                s.client().chat.completions.create(
                    model="tiny", messages=_messages(), max_tokens=400, temperature=0, stream=True
                )
            )
        idle = s.wait_idle()
        assert idle["free_slots"] == idle["max_batch"] and idle["cancelled"] >= 3


def test_keep_alive_comments_during_a_long_prefill(loaded, monkeypatch):
    import vlm.serve.engine as engine_module

    real = engine_module.row_inputs

    def slow_inputs(*a, **kw):
        time.sleep(0.8)
        return real(*a, **kw)

    monkeypatch.setattr(engine_module, "row_inputs", slow_inputs)
    with serving(loaded, keepalive_s=0.1) as s:
        body = {"messages": _messages(), "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as resp:
            lines = [x for x in resp.iter_lines() if x]
        assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
        first_data = next(i for i, x in enumerate(lines) if i > 0 and x.startswith("data: "))  # after the role chunk
        assert lines.index(": keep-alive") < first_data  # they came while the prompt was prefilled
        # the official client skips the comments
        chunks = list(s.client().chat.completions.create(model="tiny", messages=_messages(), max_tokens=3, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_x_request_id_is_echoed_and_used(loaded):
    with serving(loaded) as s:
        r = s.post({"messages": _messages(), "max_tokens": 2}, headers={"X-Request-Id": "trace-42.a"})
        assert r.headers["x-request-id"] == "trace-42.a" and r.json()["id"] == "chatcmpl-trace-42.a"
        bad = s.post({"messages": _messages(), "max_tokens": 2}, headers={"X-Request-Id": "no spaces <allowed>"})
        rid = bad.headers["x-request-id"]
        assert rid != "no spaces <allowed>" and bad.json()["id"] == f"chatcmpl-{rid}"
        err = s.post(b"{", headers={"X-Request-Id": "trace-43"})  # errors carry it too
        assert err.status_code == 400 and err.headers["x-request-id"] == "trace-43"
        raw = s.client().chat.completions.with_raw_response.create(
            model="tiny", messages=_messages(), max_tokens=2, extra_headers={"X-Request-Id": "trace-44"}
        )
        assert raw.headers["x-request-id"] == "trace-44" and raw.parse().id == "chatcmpl-trace-44"


def _stream_lines(url: str, body: dict, out: list, started: threading.Event) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line)
                    started.set()
    except httpx.HTTPError as e:
        out.append(f"error: {type(e).__name__}")
    started.set()


def test_sigterm_drains_open_requests(loaded, monkeypatch):
    with serving(loaded, drain_s=30) as s:
        _slow_steps(monkeypatch, s.engine, 0.02)
        lines, started = [], threading.Event()
        body = {"messages": _messages(), "max_tokens": 30, "temperature": 0, "stream": True}
        t = threading.Thread(target=_stream_lines, args=(s.url, body, lines, started))
        t.start()
        assert started.wait(30)
        s.srv.handle_exit(signal.SIGTERM, None)
        assert s.app.state.draining
        t.join(60)
        assert lines[-1] == "data: [DONE]", lines[-3:]  # the open stream ran to its end
        t0 = time.time()
        while s.srv.started and time.time() - t0 < 20 and not s.srv.should_exit:
            time.sleep(0.05)
    with pytest.raises(httpx.ConnectError):  # and the server is gone
        httpx.get(f"{s.url}/health", timeout=5)


def test_drain_gives_up_after_its_time_limit(loaded, monkeypatch):
    with serving(loaded, drain_s=0.5) as s:
        _slow_steps(monkeypatch, s.engine, 0.05)
        lines, started = [], threading.Event()
        body = {"messages": _messages(), "max_tokens": 400, "temperature": 0, "stream": True}
        t = threading.Thread(target=_stream_lines, args=(s.url, body, lines, started))
        t.start()
        assert started.wait(30)
        t0 = time.time()
        s.srv.handle_exit(signal.SIGTERM, None)
        t.join(30)
        assert time.time() - t0 < 10 and "data: [DONE]" not in lines


# ---- /metrics -----------------------------------------------------------------------------------------
def _scrape(url: str) -> dict:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for family in parser.text_string_to_metric_families(r.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_move_as_requests_are_served(loaded):
    with serving(loaded) as s:
        before = _scrape(s.url)
        c = s.client()
        c.chat.completions.create(model="tiny", messages=_messages(), max_tokens=6, temperature=0)
        list(c.chat.completions.create(model="tiny", messages=_messages(), max_tokens=6, temperature=0, stream=True))
        assert s.post(b"{").status_code == 400
        s.wait_idle()
        after = _scrape(s.url)

    def moved(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("vlm_requests_total", (("finish_reason", "length"),)) == 2
    assert moved("vlm_requests_refused_total", (("reason", "invalid_json"),)) == 1
    for h in (
        "vlm_time_to_first_token_seconds",
        "vlm_e2e_request_latency_seconds",
        "vlm_request_prompt_tokens",
        "vlm_request_generation_tokens",
    ):
        assert moved(f"{h}_count") == 2, h
    assert moved("vlm_request_generation_tokens_sum") == 12
    assert moved("vlm_inter_token_latency_seconds_count") >= 2
    assert moved("vlm_prefix_cache_hits_total") >= 1 and moved("vlm_prefix_cache_misses_total") >= 1
    assert moved("vlm_embed_cache_hits_total") + moved("vlm_embed_cache_misses_total") >= 2
    assert moved("vlm_generated_tokens_total") >= 10  # decode steps: each request's first token comes from its prefill
    assert after[("vlm_kv_slots", ())] == 4 and after[("vlm_kv_slots_used", ())] == 0
    assert ("vlm_requests_running", ()) in after and ("vlm_requests_waiting", ()) in after


def test_metrics_registries_are_per_app(loaded):
    with serving(loaded) as a, serving(loaded) as b:
        a.client().chat.completions.create(model="tiny", messages=_messages(), max_tokens=2)

        def served(url):  # whatever the sampled answer's finish reason
            return sum(v for (name, _), v in _scrape(url).items() if name == "vlm_requests_total")

        assert served(a.url) == 1 and served(b.url) == 0
