"""The OpenAI-compatible server, through real HTTP: uvicorn on a free port, the official `openai`
client for what it can send and raw `httpx` for what it refuses to, on each engine (serial and,
where it exists, continuous). The model is the small real export in tests/fixtures."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port
from vlm.checkpoint.load import load_checkpoint
from vlm.model.generate import generate
from vlm.serve.api import ChatRequest, Overloaded, SamplingParams
from vlm.serve.engines import build_engine
from vlm.serve.media_urls import MediaPolicy
from vlm.serve.prompt import PromptBuilder
from vlm.serve.server import ServerOptions, create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"
PROMPT = "What color is the circle?"
PNG = (FIXTURE / "circle.png").read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
LONG = 400  # new tokens: long enough to still be running when a test acts on it


def _kinds() -> list[str]:
    try:
        import vlm.serve.engine  # noqa: F401
    except ImportError:
        return ["serial"]
    return ["serial", "continuous"]


@pytest.fixture(scope="module")
def loaded():
    return load_checkpoint(FIXTURE / "export")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    shutil.copy(FIXTURE / "circle.png", d / "circle.png")
    return d


class Server:
    def __init__(self, engine, url: str):
        self.engine, self.url = engine, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def post(self, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(f"{self.url}/v1/chat/completions", content=content, timeout=60, **kw)

    def wait_idle(self, timeout: float = 20) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            s = self.engine.stats()
            if s["running"] == 0 and s.get("prefilling", 0) == 0 and s["queue_depth"] == 0:
                return s
            time.sleep(0.02)
        raise AssertionError(f"engine still busy: {self.engine.stats()}")


@pytest.fixture(scope="module", params=_kinds())
def server(request, loaded, media_dir):
    options = {"kind": request.param, "max_queue": 2}
    if request.param == "continuous":
        options["max_batch"] = 2
    engine = build_engine(loaded, options, dtype="fp32", model_name="tiny")
    media = MediaPolicy(max_images=2, max_image_pixels=100 * 100, media_root=str(media_dir))
    app = create_app(engine, ServerOptions(media, default_max_tokens=8, max_body_bytes=1 << 20, poll_s=0.05))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    with engine:
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        t0 = time.time()
        while not srv.started:
            assert time.time() - t0 < 30 and thread.is_alive(), "server did not start"
            time.sleep(0.02)
        yield Server(engine, f"http://127.0.0.1:{port}")
        srv.should_exit = True
        thread.join(10)


def _messages(url: str = DATA_URL, text: str = PROMPT) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


@pytest.fixture(scope="module")
def expected(loaded):
    """Greedy `generate()` on the prompt PromptBuilder makes for `_messages()`: (answer, prompt)."""
    from vlm.build.model import stop_ids

    builder = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, 512)
    prompt = builder([{"role": "user", "content": [{"type": "image", "image": PNG}, {"type": "text", "text": PROMPT}]}])
    eos = stop_ids(loaded.tokenizer, loaded.config.get("template"))
    model = loaded.model.float()
    ids = generate(model, prompt.batch(loaded.tokenizer.pad_id), 8, eos, 0.0, 1.0, loaded.tokenizer.structural_ids)[0]
    return loaded.tokenizer.decode([t for t in ids if t not in eos]), prompt


# ---- good requests ------------------------------------------------------------------------------
def test_models_and_health(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and "running" in r.json()["engine"]


def test_non_streamed_with_a_data_url_answers_as_generate(server, expected):
    answer, prompt = expected
    r = server.client.chat.completions.create(model="tiny", messages=_messages(), max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content == answer and r.choices[0].finish_reason == "length"
    # prompt tokens count the image's visual tokens
    assert r.usage.prompt_tokens == len(prompt) and prompt.visual_tokens == 16
    assert r.usage.prompt_tokens_details.model_extra["visual_tokens"] == 16
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == len(prompt) + 8


def test_streamed_with_a_local_path_answers_as_generate(server, expected, media_dir):
    answer, prompt = expected
    for url in (str(media_dir / "circle.png"), "circle.png", f"file://{media_dir / 'circle.png'}"):
        stream = server.client.chat.completions.create(
            model="tiny",
            messages=_messages(url),
            max_completion_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt)
    # the wire format ends with [DONE]
    body = {"messages": _messages(), "max_tokens": 2, "temperature": 0, "stream": True}
    lines = [x for x in server.post(body).text.split("\n") if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_seed_reproduces_a_sampled_answer(server):
    def ask(seed):
        kw = dict(model="tiny", messages=_messages(text="hi"), max_tokens=12, temperature=1.0, seed=seed)
        return server.client.chat.completions.create(**kw).choices[0].message.content

    first = ask(1)
    assert ask(1) == first
    assert any(ask(s) != first for s in (2, 3, 4))


def test_stop_string_ends_the_answer(server):
    r = server.client.chat.completions.create(
        model="tiny", messages=_messages(), max_tokens=8, temperature=0, stop="\n\n"
    )
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"


# ---- bad requests -------------------------------------------------------------------------------
def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 0, 0)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _with_image(url):
    return {"messages": _messages(url), "max_tokens": 4}


BAD = {
    "malformed JSON": (b'{"messages": [', 400, "invalid_json", None),
    "not an object": (b"[1, 2]", 400, "invalid_request", None),
    "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    "missing messages": ({"model": "tiny"}, 400, "missing_required_parameter", "messages"),
    "empty messages": ({"messages": []}, 400, "invalid_value", "messages"),
    "unknown model": ({"model": "gpt-4o", "messages": _messages()}, 404, "model_not_found", "model"),
    "bad role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages"),
    "bad part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "invalid_value", "messages"),
    "bad base64": (_with_image("data:image/png;base64,@@@not base64@@@"), 400, "invalid_base64", None),
    "data URL not an image": (_with_image("data:text/plain;base64,aGVsbG8="), 400, "invalid_image_url", None),
    "image bytes not an image": (_with_image("data:image/png;base64,aGVsbG8="), 400, "invalid_image", None),
    "remote URL": (_with_image("https://example.com/cat.png"), 400, "invalid_image_url", None),
    # every refused path answers alike: nothing tells which paths exist
    "missing file": (_with_image("nope.png"), 400, "media_path_refused", None),
    "file outside the media root": (_with_image("/etc/hostname"), 400, "media_path_refused", None),
    "missing file outside the media root": (_with_image("/nonexistent/x.png"), 400, "media_path_refused", None),
    "too many images": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}] * 3}]},
        400,
        "too_many_images",
        "messages",
    ),
    "image over the pixel cap": (_with_image(_png(128, 128)), 400, "image_too_large", None),
    "prompt + max_tokens over the context": (
        {"messages": _messages(), "max_tokens": 600},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    "n over the cap": ({"messages": _messages(), "n": 9}, 400, "invalid_value", "n"),
    "presence_penalty out of range": (
        {"messages": _messages(), "presence_penalty": 2.5},
        400,
        "invalid_value",
        "presence_penalty",
    ),
    "top_logprobs over 20": (
        {"messages": _messages(), "logprobs": True, "top_logprobs": 21},
        400,
        "invalid_value",
        "top_logprobs",
    ),
    "min_p over 1": ({"messages": _messages(), "min_p": 1.5}, 400, "invalid_value", "min_p"),
    "bad JSON schema": (
        {"messages": _messages(), "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
        400,
        "invalid_value",
        "response_format",
    ),
    "temperature a string": ({"messages": _messages(), "temperature": "hot"}, 400, "invalid_value", "temperature"),
    "max_tokens 0": ({"messages": _messages(), "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    "stop not strings": ({"messages": _messages(), "stop": [1]}, 400, "invalid_value", "stop"),
    "tools": ({"messages": _messages(), "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    "stream_options without stream": (
        {"messages": _messages(), "stream_options": {"include_usage": True}},
        400,
        "invalid_value",
        "stream_options",
    ),
    "body over the size cap": ({"messages": _messages("x" * (2 << 20))}, 413, "body_too_large", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_openai_error(server, case):
    body, status, code, param = BAD[case]
    r = server.post(body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    assert "Traceback" not in err["message"]


def test_the_client_library_sees_the_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="other", messages=_messages())
    with pytest.raises(openai.BadRequestError, match="does not fetch remote URLs"):
        server.client.chat.completions.create(model="tiny", messages=_messages("http://example.com/a.png"))
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404


def test_a_bad_request_leaves_a_concurrent_good_one_untouched(server, expected):
    answer = expected[0]
    out = {}

    def good():
        r = server.client.chat.completions.create(model="tiny", messages=_messages(), max_tokens=8, temperature=0)
        out["answer"] = r.choices[0].message.content

    t = threading.Thread(target=good)
    t.start()
    for case in ("malformed JSON", "bad base64", "image over the pixel cap", "prompt + max_tokens over the context"):
        body, status, _, _ = BAD[case]
        assert server.post(body).status_code == status
    t.join(60)
    assert out["answer"] == answer
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


# ---- streams that end early, queues that fill -----------------------------------------------------
def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.wait_idle()
    body = {"messages": _messages(), "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leave with the answer unfinished
    after = server.wait_idle(timeout=10)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"]


def test_a_full_queue_answers_429(server):
    server.wait_idle()
    handles = []
    request = ChatRequest(_internal_messages(), SamplingParams(max_tokens=LONG, temperature=0.0))
    try:
        with pytest.raises(Overloaded):
            for _ in range(64):
                handles.append(server.engine.submit(request))
                time.sleep(0.05)  # let the engine move admitted requests into slots
        r = server.post({"messages": _messages(), "max_tokens": 2})
        assert r.status_code == 429 and r.headers.get("retry-after") == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for h in handles:
            h.cancel()
    server.wait_idle()
    r = server.post({"messages": _messages(), "max_tokens": 2})
    assert r.status_code == 200


def _internal_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": PNG}, {"type": "text", "text": PROMPT}]}]


# ---- the config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", _kinds())
def test_serve_config_builds_the_engine_and_options(kind, loaded, tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF
    from vlm.serve.engines import ServeConfigError
    from vlm.serve.server import options_from

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt={FIXTURE / 'export'}", f"engine={kind}", "media.max_images=3"])
        bad = compose("serve", overrides=[f"engine={kind}", "+engine.bogus=1"])
    opts = options_from(cfg)
    assert opts.media.max_images == 3 and opts.max_body_bytes == 64 << 20 and opts.default_temperature == 1.0
    engine = build_engine(loaded, cfg.engine, dtype="fp32", model_name=cfg.model_name, ckpt=cfg.ckpt)
    assert engine.model_name == "export" and engine.max_context == 512
    with pytest.raises(ServeConfigError, match="bogus"):
        build_engine(loaded, bad.engine)


# ---- the OpenAI sampling parameters ------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}


def test_the_client_gets_n_choices_logprobs_and_schema_json(server):
    pytest.importorskip("llguidance")
    kw = dict(
        model="tiny",
        messages=_messages(),
        max_tokens=40,
        temperature=1.0,
        seed=5,
        n=2,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}},
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "presence_penalty": 0.2},
    )
    r = server.client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        answer = json.loads(c.message.content)
        assert answer["color"] in ("red", "green", "blue") and 0 <= answer["count"] <= 9 and len(answer) == 2
        content = c.logprobs.content
        assert "".join(t.token for t in content) == c.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and bytes(t.bytes).decode() == t.token for t in content)
    assert server.client.chat.completions.create(**kw).choices[1].message.content == r.choices[1].message.content
    # streamed: every chunk names its choice; the choices' texts and logprobs add up to the same
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    for i, c in enumerate(r.choices):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert "".join(x.delta.content or "" for x in mine) == c.message.content
        assert [t.logprob for x in mine if x.logprobs for t in x.logprobs.content] == [
            t.logprob for t in c.logprobs.content
        ]
        assert mine[-1].finish_reason == c.finish_reason
