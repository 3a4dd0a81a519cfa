"""Packed GEMMs (`vlm.model.packed`): oneDNN's linear over weights packed once gives `F.linear`'s
result, is used only at inference, follows in-place weight changes, and leaves the module's
parameters and state_dict as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm.model import packed
from vlm.model.packed import PackedLinear, available, pack_linears

pytestmark = pytest.mark.skipif(not available(torch.float32), reason="no oneDNN packed linear in this torch build")


@pytest.fixture
def small_gemms_packed(monkeypatch):
    monkeypatch.setattr(packed, "SMALL", 0)  # tiny layers take the packed path too


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 32, bias=False)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_give_f_linear_results(small_gemms_packed, dtype):
    if not available(dtype):
        pytest.skip(f"no packed {dtype} GEMM on this CPU")
    m = model().to(dtype)
    x = torch.randn(3, 5, 48).to(dtype)
    with torch.no_grad():
        want = m(x)
        keys = list(m.state_dict())
        assert pack_linears(m) == 2
        assert all(type(layer) is PackedLinear for layer in (m[0], m[2]))
        got = m(x)
        one = m(x[1:2, 2:3])  # a row does not depend on the others in the call
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(one, got[1:2, 2:3], atol=0, rtol=0)
    assert list(m.state_dict()) == keys
    assert m[0]._gemm is not None  # packed lazily, on the first call


def test_grad_and_weight_updates_never_read_a_stale_pack(small_gemms_packed):
    m = model()
    pack_linears(m)
    x = torch.randn(4, 48)
    with torch.no_grad():
        m(x)
        first = m[0]._gemm
        m[0].weight.mul_(2)  # in place: the version counter moves, the pack is redone
        got = m(x)
        assert m[0]._gemm is not first
    torch.testing.assert_close(got, m[2](F.silu(F.linear(x, m[0].weight, m[0].bias))), atol=1e-5, rtol=1e-5)
    y = m(x)  # grad on: plain F.linear, gradients reach the weights
    y.sum().backward()
    assert m[0].weight.grad is not None


def test_unpacking_restores_plain_linears(small_gemms_packed):
    m = model()
    assert pack_linears(m) == 2
    with torch.no_grad():
        m(torch.randn(2, 48))
    assert pack_linears(m, enabled=False) == 0
    assert all(type(layer) is nn.Linear for layer in (m[0], m[2]))
    assert "_gemm" not in m[0].__dict__


def test_small_gemms_stay_on_f_linear():
    m = model()
    pack_linears(m)
    with torch.no_grad():
        m(torch.randn(1, 48))  # 1 x 48 x 96 multiply-adds: below SMALL
    assert m[0]._gemm is None


def test_fused_projections_follow_casts_and_replaced_layers(small_gemms_packed):
    """q/k/v fused into one (packed) GEMM give the three layers' outputs; once the module is cast
    or a layer replaced, the fused buffer is stale and the layers run one by one."""
    from vlm.model.attention import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(32, 4, 2, qkv_bias=True).eval()
    pack_linears(attn)
    assert attn.fuse_projections(True)
    x = torch.randn(2, 3, 32)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.no_grad():
        fused = attn._qkv(x, layers)
        torch.testing.assert_close(list(fused), [F.linear(x, m.weight, m.bias) for m in layers], atol=1e-5, rtol=1e-5)
        attn.to(torch.float64)  # a cast: new tensors, no longer views of the fused buffer
        assert attn._qkv(x.double(), layers) is None
        attn.to(torch.float32)
        assert attn.fuse_projections(True)
        attn.k_proj = nn.Linear(32, 16, bias=True)
        assert attn._qkv(x, (attn.q_proj, attn.k_proj, attn.v_proj)) is None
        assert attn(x).shape == (2, 3, 32)  # runs layer by layer
