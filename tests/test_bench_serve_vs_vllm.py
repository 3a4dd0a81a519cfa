"""bench/serve_vs_vllm.py with `--skip-vllm` on one tiny level: the build, the hf_qwen2vl export,
our server on a loopback port, the streamed load, two rounds pooled and the table (vLLM itself is
not installed here)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_skip_vllm_measures_our_server_alone():
    cmd = [sys.executable, str(ROOT / "bench" / "serve_vs_vllm.py"), "--skip-vllm", "--dtype", "fp32"]
    cmd += ["--levels", "1", "--requests", "2", "--new-tokens", "4", "--rounds", "2"]
    cmd += ["--ours", "engine.prefill_groups=2"]  # an override of our server's passes through
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert "CPU:" in out and "ours ran fp32" in out, out
    row = re.search(r"^\| 1 \| ([\d.]+) / – \| – \| [\d.–]+ / – \| (\d+) / – \| (\d+) / – \|$", out, re.M)
    assert row, out
    assert float(row.group(1)) > 0  # tokens/s
    assert out.count("2/2 ok") == 2 and out.count("ours ready on") == 2, out  # one run per round
    assert "2 rounds in alternating order, pooled" in out, out
    assert "vLLM ran" not in out  # skipped: no vLLM side


def test_ours_overrides_must_be_key_value():
    import pytest

    sys.path.insert(0, str(ROOT / "bench"))
    import serve_vs_vllm

    assert serve_vs_vllm.parse_args(["--ours", "engine.prefill_groups=4"]).ours == ["engine.prefill_groups=4"]
    with pytest.raises(SystemExit):
        serve_vs_vllm.parse_args(["--ours", "prefill_groups"])
