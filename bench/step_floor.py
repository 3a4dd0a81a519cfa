"""How fast can the training step of a model size go without Lightning? A floor for its MFU.

    python bench/step_floor.py                      # tiny: bare bf16-mixed step, forward only, bf16-true, fp32
    python bench/step_floor.py --sizes tiny,25m --steps 10
    python bench/step_floor.py --threads 1 --modes mixed,forward   # one core: how much the second thread buys

The same model and fixed synthetic batch as `bench/train_throughput.py` (whose table is the
Lightning step: loss normalisation, numerics guard, clipping, throughput callback), run as a bare
loop: forward + backward + fused AdamW, no guard, no clipping, no logging. Each mode:

    mixed     autocast bf16 with fp32 weights (what `trainer.precision=bf16-mixed` runs)
    forward   the mixed forward alone, under no_grad
    bf16_true weights and batch in bf16, no autocast (no per-step weight casts)
    fp32      no autocast

The modes take turns for `--rounds` rounds of `--steps` steps (the machine may be shared: a
burst of other work then hits every mode alike). It prints each mode's best per-round median, and
the step time that would give 50% of the measured bf16 GEMM rate (`vlm.training.callbacks.measure_gemm_tflops`,
1024³, 2 s, as the bench) for that size's model FLOPs per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODES = ("mixed", "forward", "bf16_true", "fp32")


def _module(size: str, tmp: str):
    import torch
    import train_throughput as tt

    torch.manual_seed(0)
    return tt.build(size, {"tmp": tmp, "ac": "none", "compile": False}, tt.SIZES[size]["batch_cpu"])


def _step_flops(module, batch) -> float:
    from vlm.training.callbacks import FlopModel
    from vlm.training.gradient_step import batch_stats

    st = {k: float(v) for k, v in batch_stats(module.model, batch).items()}
    st["label_tokens"] = float((batch["labels"][:, 1:] != -100).sum())
    return FlopModel(module.model)(st)["total"]


class Mode:
    """One mode's model, batch and optimizer; `run(n)` times n steps."""

    def __init__(self, size: str, mode: str):
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            self.module, self.batch = _module(size, tmp)
        if mode == "bf16_true":
            self.module = self.module.to(torch.bfloat16)
            self.batch = {**self.batch, "pixel_patches": self.batch["pixel_patches"].bfloat16()}
        self.mode = mode
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=1e-4, fused=True)

    def run(self, n: int) -> list[float]:
        import torch

        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.mode in ("mixed", "forward")):
                if self.mode == "forward":
                    with torch.no_grad():
                        self.module.loss_sum(self.batch)
                else:
                    loss, _ = self.module.loss_sum(self.batch)
            if self.mode != "forward":
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny", help="comma list of bench/train_throughput.py's sizes (cpu only)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, one per core)")
    ap.add_argument("--rounds", type=int, default=3, help="the modes take turns this many times; the best round counts")
    a = ap.parse_args()
    import torch
    import train_throughput as tt

    from vlm.training.callbacks import measure_gemm_tflops

    modes = a.modes.split(",")
    if bad := [s for s in a.sizes.split(",") if s not in tt.SIZES]:
        raise SystemExit(f"--sizes: unknown {bad}; choose from {list(tt.SIZES)}")
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {bad}; choose from {list(MODES)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    peak = measure_gemm_tflops(torch.bfloat16, seconds=2.0)
    print(f"cpu ({torch.get_num_threads()} threads), bf16 GEMM rate {peak:.3f} TFLOP/s\n")
    print("| size | GFLOP / step | ms for 50% | " + " | ".join(f"{m} ms" for m in modes) + " |")
    print("|---|---:|---:|" + "---:|" * len(modes))
    for size in a.sizes.split(","):
        runs = [Mode(size, m) for m in modes]
        flops = _step_flops(runs[0].module, runs[0].batch)
        for r in runs:
            r.run(a.warmup)
        best = [float("inf")] * len(modes)
        for _ in range(a.rounds):  # interleaved, so a burst of other load hits every mode alike
            for i, r in enumerate(runs):
                best[i] = min(best[i], statistics.median(r.run(a.steps)))
        ms = [b * 1e3 for b in best]
        print(
            f"| {size} | {flops / 1e9:.1f} | {flops / (0.5 * peak * 1e12) * 1e3:.0f} | "
            + " | ".join(f"{x:.0f}" for x in ms)
            + " |"
        )


if __name__ == "__main__":
    main()
