"""`infer.py chat=true` (a subprocess with piped stdin) and `infer.py requests=FILE.jsonl` (the
same `run` in-process), on the small real export in tests/fixtures."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_infer
from vlm.serve.infer import run

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"
EXPORT = FIXTURE / "export"
STATUS = re.compile(r"\[(\d+) prompt tokens \((\d+) visual, (\d+) from the prefix cache\), (\d+) new")


def test_chat_with_piped_stdin_keeps_the_conversation(tmp_path):
    shutil.copy(FIXTURE / "circle.png", tmp_path / "circle.png")
    stdin = "\n".join(
        [
            "/image circle.png",
            "What color is the circle?",
            "/image missing.png",  # refused with one line; the chat goes on
            "/frobnicate",
            "And its shape?",
            "/quit",
            "never asked",
        ]
    )
    cmd = [sys.executable, str(ROOT / "infer.py"), f"ckpt={EXPORT}", "chat=true", "verbose=true"]
    cmd += ["max_new_tokens=4", "temperature=1.0", f"hydra.run.dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    turns = [tuple(map(int, m.groups())) for m in STATUS.finditer(p.stderr)]
    assert len(turns) == 2, p.stderr
    (p1, v1, c1, n1), (p2, v2, c2, n2) = turns
    assert v1 == v2 == 16  # the image of the first turn is still in the conversation
    assert p2 > p1 + n1  # the second prompt holds the first question, its answer and the new one
    assert c1 == 0 and c2 > v1  # the follow-up reuses the first turn's KV, image included (prefix cache)
    assert "error: media 'missing.png' refused [missing]" in p.stderr
    assert "unknown command /frobnicate" in p.stderr
    assert "Traceback" not in p.stderr


def test_batch_file_with_a_bad_line(tmp_path):
    shutil.copy(FIXTURE / "circle.png", tmp_path / "circle.png")
    url = "data:image/png;base64," + base64.b64encode((FIXTURE / "circle.png").read_bytes()).decode()

    def ask(image, **kw):
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What color?"}]
        return {"messages": [{"role": "user", "content": content}], **kw}

    lines = [
        json.dumps(ask("circle.png", max_tokens=3)),  # relative to the requests file
        '{"messages": [',
        json.dumps({"custom_id": "q3", "body": {"model": "gpt-4o", **ask(url)}}),
        "",
        json.dumps(ask("https://example.com/x.png")),
        json.dumps(ask(url, max_tokens=10_000)),
        json.dumps(ask(url, temperature=1.0, seed=7, max_tokens=5)),
    ]
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    cfg = compose_infer(
        [f"ckpt={EXPORT}", f"requests={requests}", f"out={out}", "max_new_tokens=4", "engine.max_queue=2"],
        tmp_path,
        tmp_path,
    )
    res = run(cfg)
    assert (res["ok"], res["errors"]) == (3, 3)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 5, 6, 7]
    assert rows[0]["answer"] == "\n" * 3 and rows[0]["finish_reason"] == "length"
    assert rows[0]["usage"]["prompt_tokens_details"]["visual_tokens"] == 16
    assert rows[0]["id"].startswith("chatcmpl-")
    assert rows[1]["error"]["code"] == "invalid_json"
    assert rows[2]["custom_id"] == "q3" and rows[2]["usage"]["completion_tokens"] == 4  # max_new_tokens
    assert rows[3]["error"]["code"] == "invalid_image_url"
    assert rows[4]["error"]["code"] == "context_length_exceeded"
    assert rows[5]["usage"]["completion_tokens"] <= 5


def test_batch_refuses_a_missing_requests_file(tmp_path):
    cfg = compose_infer([f"ckpt={EXPORT}", f"requests={tmp_path / 'nope.jsonl'}"], tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="requests file not found"):
        run(cfg)


@pytest.mark.parametrize("kind", ["continuous", "serial"])
def test_single_prompt_is_one_request_on_the_engine(tmp_path, monkeypatch, capsys, kind):
    """`infer.py image=… prompt=…` submits one request to the `engine` group's engine and prints
    its Delta texts as they come."""
    from vlm.serve import local
    from vlm.serve.api import Delta

    built = []

    def spy(*args, **kw):
        engine = build_engine(*args, **kw)
        submit = engine.submit

        def submit_and_watch(request):
            handle = submit(request)
            events = handle.events

            def watched(timeout=None):
                for ev in events(timeout):
                    if isinstance(ev, Delta):
                        built.append(ev.text)
                    yield ev

            handle.events = watched
            return handle

        engine.submit = submit_and_watch
        built.append(engine)
        return engine

    build_engine = local.build_engine
    monkeypatch.setattr(local, "build_engine", spy)
    args = [f"ckpt={EXPORT}", f"image={FIXTURE / 'circle.png'}", "prompt=What color is the circle?"]
    cfg = compose_infer([*args, "max_new_tokens=5", f"engine={kind}"], tmp_path, tmp_path)
    res = run(cfg)
    engine, *deltas = built
    stats = engine.stats()
    assert stats["finished"] == 1 and stats["errors"] == 0 and stats["max_batch"] == 1
    assert res["usage"].visual_tokens == 16 and res["usage"].completion_tokens == 5
    assert "".join(deltas) == res["answer"] and capsys.readouterr().out == res["answer"] + "\n"
    # a request the engine refuses is one user-facing error, not a traceback
    from vlm.errors import SampleError

    cfg = compose_infer([*args, "max_new_tokens=100000", f"engine={kind}"], tmp_path, tmp_path)
    with pytest.raises(SampleError, match="context_length_exceeded"):
        run(cfg)
    # infer.prune becomes the engine's pruning options
    prune = ["infer.prune.keep_ratio=0.5", "infer.prune.method=random", "infer.prune.seed=3"]
    built.clear()
    run(compose_infer([*args, "max_new_tokens=2", f"engine={kind}", *prune], tmp_path, tmp_path))
    assert built[0].prune == {"keep_ratio": 0.5, "method": "random", "seed": 3}
