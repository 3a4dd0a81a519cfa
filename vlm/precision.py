"""Which floating-point precision is fast on this machine.

bf16 pays off on a CPU only with native bf16 instructions (AVX-512 BF16 or AMX): there a bf16
matmul runs ~2.7x faster than fp32. Without them PyTorch emulates bf16 and the same matmul is
tens of times *slower* than fp32, so the CPU trainer's default precision (`conf/trainer/cpu.yaml`:
`${vlm.cpu_precision:}`) and the serving engine's default dtype follow this check.
"""

from __future__ import annotations

import functools
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def fast_bf16_cpu() -> bool:
    """True when this CPU has native bf16 matmuls (AVX-512 BF16 / AMX) and PyTorch dispatches to them."""
    import torch

    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: PyTorch's AVX-512 dispatch is the best hint there is
        return True
    return any(f in flags for f in BF16_FLAGS)


def cpu_precision() -> str:
    """The Lightning precision for CPU training: `bf16-mixed` where bf16 is fast, else `32-true`."""
    return "bf16-mixed" if fast_bf16_cpu() else "32-true"


def register_resolvers() -> None:
    """`${vlm.cpu_precision:}` in configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("vlm.cpu_precision"):
        OmegaConf.register_new_resolver("vlm.cpu_precision", cpu_precision)
