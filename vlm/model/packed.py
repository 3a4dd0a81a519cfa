"""Inference GEMMs on the CPU with their weights packed once for oneDNN.

`F.linear` hands PyTorch's CPU GEMM a plain `[out, in]` weight and lets it re-block the matrix
on every call; oneDNN's linear over a weight reordered once into its own blocked layout skips that
work. For the small-row GEMMs of a decode step the difference is large: qwen40m's 12 decoder layers
(2-core AVX-512 CPU, 2 threads) take 12.4 / 17.5 / 22.2 / 32.4 ms in fp32 with `F.linear` at
1 / 4 / 16 / 32 rows, 5.6 / 4.7 / 8.1 / 13.3 ms packed, and 5.7 / 6.1 / 8.5 / 10.9 ms vs
2.3 / 2.6 / 4.3 / 6.9 ms in bf16; prompt-sized GEMMs (256-1564 rows) gain 10-15%.

The packed copy is extra memory (the plain weight stays: training, `state_dict`, tied embeddings
and the fallback read it), made lazily on a layer's first packed call, so layers that never run
packed (q/k/v when `fuse_projections` runs them as one GEMM) cost nothing. A packed GEMM is used
only with grad off, only while the weight is the tensor it was packed from, unchanged (same
storage, same version counter: an in-place update or a cast repacks it), and only for GEMMs big
enough to repay oneDNN's fixed cost per call (`SMALL`).

fp32 results differ from `F.linear`'s in the last bits (another summation order, ~4e-6 on unit
activations), and a row's result does not depend on the other rows in the call.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """oneDNN's packed linear runs here for `dtype` (and gives `F.linear`'s result)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=g).to(dtype)
        b = torch.randn(24, generator=g).to(dtype)
        x = torch.randn(2, 3, 40, generator=g).to(dtype)
        with torch.no_grad():
            got = PackedGemm(w, b)(x)
            want = F.linear(x, w, b)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return got.shape == want.shape and bool(torch.allclose(got.float(), want.float(), atol=tol, rtol=tol))
    except Exception as e:  # noqa: BLE001 - a torch built without the op: plain GEMMs
        log.info("packed GEMMs unavailable for %s: %s", dtype, e)
        return False


_LINEAR = torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None

#: multiply-adds below which `F.linear` is faster: a packed call costs ~15 us more to set up (one row
#: through a 512x512 weight: 26 vs 24 us in fp32; 128x512: 19 vs 7 us)
SMALL = 512 * 512


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return -1


class PackedGemm:
    """`y = x @ weight.T + bias` with `weight [out, in]` reordered once for oneDNN.

    x: `[..., in]` -> `[..., out]`. `fresh(weight, bias)`: still packed from these tensors as they are."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()
        # what `fresh` compares, kept flat: it runs before every GEMM of a decode step
        self._w, self._wv = weight.data_ptr(), _version(weight)
        self._b, self._bv = (0, 0) if bias is None else (bias.data_ptr(), _version(bias))
        self._shape, self._dtype = weight.shape, weight.dtype

    def fresh(self, weight: Tensor, bias: Tensor | None) -> bool:
        if self._wv < 0 or weight.data_ptr() != self._w or weight._version != self._wv:
            return False  # (no version counter: never trusted)
        if weight.dtype != self._dtype or weight.shape != self._shape:
            return False
        if bias is None:
            return self._b == 0
        return bias.data_ptr() == self._b and _version(bias) == self._bv

    def __call__(self, x: Tensor) -> Tensor:
        return _LINEAR(x, self.packed, self.bias, "none", [], "")


def packed_gemm(cached: PackedGemm | None, weight: Tensor, bias: Tensor | None) -> PackedGemm:
    """`cached` if it is still packed from `weight` and `bias`, else a new pack of them."""
    return cached if cached is not None and cached.fresh(weight, bias) else PackedGemm(weight, bias)


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose inference forward runs a packed GEMM (`pack_linears` turns a plain
    `nn.Linear` into one in place; its parameters and `state_dict` stay the same)."""

    _gemm: PackedGemm | None = None

    def forward(self, x: Tensor) -> Tensor:
        if (
            torch.is_grad_enabled()
            or x.numel() * self.out_features < SMALL  # read at call time: tests lower it
            or x.device.type != "cpu"
            or x.dtype != self.weight.dtype
        ):
            return F.linear(x, self.weight, self.bias)
        return self.packed()(x)

    def packed(self) -> PackedGemm:
        """The packed GEMM of the layer's weight and bias as they are now (packed again if they changed)."""
        self._gemm = packed_gemm(self._gemm, self.weight, self.bias)
        return self._gemm


def pack_linears(model: nn.Module, enabled: bool = True) -> int:
    """Every plain `nn.Linear` of `model` runs packed GEMMs at inference (`enabled=False`: back to
    `F.linear`, packed copies dropped). Only on the CPU, for a dtype `available` says works; returns
    how many layers are packed."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and enabled and m.weight.device.type == "cpu" and available(m.weight.dtype):
            m.__class__ = PackedLinear
        elif type(m) is PackedLinear and not enabled:
            m.__class__ = nn.Linear
            m.__dict__.pop("_gemm", None)
        n += type(m) is PackedLinear
    return n
