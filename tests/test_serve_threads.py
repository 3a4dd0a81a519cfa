"""`vlm.serve.threads`: the engine thread's OpenMP team is the serving process's only one."""

from __future__ import annotations

import threading


def test_only_the_engine_thread_runs_multi_threaded_ops():
    """The preprocessing threads run torch single-threaded (no OpenMP team of their own, so the
    engine thread's workers keep spinning between its parallel regions); nobody else's setting moves."""
    import torch

    from tests.test_serve_engine import CTX, WORDS, tiny
    from vlm.serve.engine import Engine, EngineConfig
    from vlm.serve.threads import single_threaded, single_threaded_here
    from vlm.tokenizer import train_tokenizer

    before = torch.get_num_threads()
    probe = []
    t = threading.Thread(target=lambda: probe.append((single_threaded_here(), torch.get_num_threads())))
    t.start()
    t.join()
    if not probe[0][0]:
        return  # not libgomp: nothing to check
    assert probe[0][1] == 1 and torch.get_num_threads() == before  # the other threads keep theirs
    engine = Engine(tiny(train_tokenizer(WORDS * 10, vocab_size=300)), EngineConfig(max_context=CTX, dtype="fp32"))
    try:
        assert engine.pool.submit(torch.get_num_threads).result(10) == 1
    finally:
        engine.close()
    assert torch.get_num_threads() == before
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before  # this thread's count comes back


PROBE = """
import os, torch
import torch.nn.functional as F
from vlm.serve.threads import single_threaded_here
torch.set_num_threads(2)
ok = single_threaded_here()
before = len(os.listdir('/proc/self/task'))
with torch.no_grad():
    F.linear(torch.randn(256, 512), torch.randn(512, 512))  # MKL's fp32 GEMM, big enough to go parallel
    torch.randn(1 << 20).exp()  # an ATen parallel loop
print(ok, before, len(os.listdir('/proc/self/task')))
"""


def test_a_single_threaded_thread_starts_no_team_for_an_fp32_gemm():
    """MKL keeps its own thread count: a thread made single-threaded must not start a team of MKL's
    size for a plain fp32 `F.linear` (the serving process's main thread loads the model and probes
    GEMMs). No new OS thread appears in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, before, after = out.stdout.split()
    if ok != "True":
        return  # not libgomp: nothing to check
    assert int(after) == int(before), f"{int(after) - int(before)} OpenMP worker thread(s) started"
