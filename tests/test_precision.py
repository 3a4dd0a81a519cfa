"""The CPU trainer's default precision follows the CPU: bf16 only where it has native bf16 matmuls."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_train
from vlm import precision


@pytest.mark.parametrize(
    "capability,cpuinfo,expected",
    [
        ("AVX2", "flags: avx2 fma", "32-true"),
        ("AVX512", "flags: avx512f avx512bw", "32-true"),  # AVX-512 without bf16: emulated, slow
        ("AVX512", "flags: avx512f avx512_bf16", "bf16-mixed"),
        ("AVX512", "flags: avx512f amx_bf16 amx_tile", "bf16-mixed"),
    ],
)
def test_cpu_precision_follows_the_cpu(monkeypatch, tmp_path, capability, cpuinfo, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "Path", lambda _: info)
    precision.fast_bf16_cpu.cache_clear()
    try:
        assert precision.cpu_precision() == expected
    finally:
        precision.fast_bf16_cpu.cache_clear()


def test_the_cpu_trainer_resolves_its_precision(tmp_path, synth_dir):
    cfg = compose_train([], tmp_path, synth_dir)  # TINY sets 32-true; the default resolves
    assert cfg.trainer.precision == "32-true"
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train")
    assert cfg.trainer.precision == precision.cpu_precision()
