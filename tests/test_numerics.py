"""Loss normalisation over gradient accumulation, and the non-finite guard (one process).

The two-process versions (ddp, fsdp) are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from tests.test_distributed import (
    GROUP_SIZES,
    _result,
    fixed_samples,
    micro_batches,
    tiny_module,
    train_fixed,
)


def test_accumulated_step_equals_one_big_batch_and_naive_mean_differs(synth_dir, tmp_path):
    common = {"strategy": "single", "steps": 1, "data_dir": str(synth_dir)}
    train_fixed({**common, "accum": 1, "out": str(tmp_path / "big")})
    train_fixed({**common, "accum": 2, "out": str(tmp_path / "acc")})
    (big, tb), (acc, ta) = _result(tmp_path / "big"), _result(tmp_path / "acc")
    # ours: the accumulated step's gradient (normalised, clipped, as the optimizer sees it) is the big batch's
    for k in tb["grads"]:
        torch.testing.assert_close(ta["grads"][k], tb["grads"][k], rtol=1e-4, atol=1e-7)
    assert acc["losses"]["1"] == pytest.approx(big["losses"]["1"], rel=1e-6)

    # naive: mean of the two micro-batch means, on the same fresh model and the same clipping
    _, dm, module = tiny_module(tmp_path / "naive", synth_dir)
    samples = fixed_samples(dm, 8)
    mbs = micro_batches(samples, 0, 1, 2, 0, dm.tokenizer.pad_id)
    counts = []
    for b in mbs:
        total, n = module.loss_sum(b)
        loss = total / n
        (loss / len(mbs)).backward()
        counts.append(n)
    assert counts[0] != counts[1] and GROUP_SIZES[2] == [3, 5]  # uneven micro-batches
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    naive = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    diff = max(
        float((naive[k] - tb["grads"][k]).abs().max() / tb["grads"][k].abs().max().clamp_min(1e-12)) for k in naive
    )
    assert diff > 1e-2, f"naive normalisation should differ, max relative difference {diff}"


def test_nonfinite_step_is_skipped(synth_dir, tmp_path):
    out = tmp_path / "skip"
    train_fixed(
        {
            "strategy": "single",
            "steps": 3,
            "accum": 2,
            "nan_step": 1,
            "nan_rank": 0,
            "out": str(out),
            "data_dir": str(synth_dir),
        }
    )
    res, t = _result(out)
    assert torch.isfinite(torch.tensor(res["losses"]["1"])) and not torch.isfinite(torch.tensor(res["losses"]["2"]))
    assert torch.equal(t["params"][2], t["params"][1])  # no update: weights (and AdamW state) untouched
    assert res["skipped"] == {"1": 0, "2": 1, "3": 1}
    assert torch.isfinite(torch.tensor(res["losses"]["3"])) and not torch.equal(t["params"][3], t["params"][2])


def test_nonfinite_halt_stops_with_a_clear_message(synth_dir, tmp_path):
    from vlm.training.gradient_step import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"step 1: non-finite loss and gradient norm .*numerics.on_nonfinite=halt"):
        train_fixed(
            {
                "strategy": "single",
                "steps": 3,
                "accum": 1,
                "nan_step": 1,
                "nan_rank": 0,
                "on_nonfinite": "halt",
                "out": str(tmp_path / "halt"),
                "data_dir": str(synth_dir),
            }
        )


def test_our_clipping_equals_clip_grad_norm(synth_dir, tmp_path):
    """VLMModule.configure_gradient_clipping (`GradientStep.clip`: the norm taken by the step's
    guard, works with the fused AdamW of conf/optimizer/adamw.yaml) gives the update
    `clip_grad_norm_` would: the gradient the optimizer sees equals the big batch's mean-token
    gradient clipped with torch."""
    train_fixed(
        {"strategy": "single", "steps": 1, "accum": 1, "data_dir": str(synth_dir), "out": str(tmp_path / "ours")}
    )
    _, ours = _result(tmp_path / "ours")
    _, dm, module = tiny_module(tmp_path / "ref", synth_dir)
    assert module.optimizer_factory.keywords.get("fused") is True
    (batch,) = micro_batches(fixed_samples(dm, 8), 0, 1, 1, 0, dm.tokenizer.pad_id)
    total, n = module.loss_sum(batch)
    loss = total / n
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    assert norm > 1.0  # the clip is active at this step
    for n, p in module.named_parameters():
        torch.testing.assert_close(ours["grads"][n], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_parallel_options_are_checked():
    """conf/parallel/default.yaml: a wrong value or an unknown key is one clear error."""
    from vlm.training.parallel import ParallelConfig

    assert ParallelConfig.from_dict({"init": "all_ranks"}).init == "all_ranks"
    for bad, match in (
        ({"init": "rank1"}, "parallel.init must be one of"),
        ({"ac": "some"}, "parallel.ac must be"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"inti": "rank0"}, "unknown parallel options"),
    ):
        with pytest.raises(ValueError, match=match):
            ParallelConfig.from_dict(bad)


@pytest.mark.parametrize("precision,fused", [("bf16-mixed", True), ("16-mixed", False), ("32-true", True)])
def test_fused_adamw_only_without_fp16_loss_scaling(synth_dir, tmp_path, precision, fused):
    """A fused optimizer unscales fp16 gradients inside its step, after our normalisation, guard and
    clipping; with 16-mixed the module builds the unfused one instead."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    _, _, module = tiny_module(tmp_path, synth_dir)
    kw = (
        {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
        if precision == "16-mixed"
        else {"precision": precision}
    )  # Lightning turns 16-mixed into bf16 on a CPU: give it the fp16 scaler
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **kw)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert bool(opt.defaults.get("fused")) is fused
