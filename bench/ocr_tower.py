"""Is OCR limited by the tower or by the route to the answer? A causal check on synthvqa OCR.

    python bench/ocr_tower.py --task char                                  # 1-character OCR: 1000 + 1000 vs 1600 steps
    python bench/ocr_tower.py --min-len 3 --max-len 6 --vlm-steps 1500     # synthvqa's own 3-6 characters

Arm `tower warmed up`: the default ViT first trains alone on `--task` (`vlm.training.warmup`, the
`tower_warmup` stage of train.py: `glyphs` reads every character of 1..max-len strings in place,
with its first / next character; `char` names one character), `--probe-steps` at batch 32; then
the default VLM with that tower trains on the OCR family through the real Trainer
(`--vlm-steps`). Arm `from scratch`: the same VLM and data, a fresh tower, and `--vlm-steps` plus
as many steps as the warm-up took in time (at least as much compute). It prints held-out OCR exact
match (whole strings) and the last training loss per arm. Data are generated under --root (20k
training images) on first use. Measured numbers: vlm/training/warmup.py and docs/results/default_recipe.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_arm(name: str, args, probe_steps: int, vlm_steps: int) -> dict:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from vlm.training.datamodule import build_datamodule
    from vlm.training.train import build_callbacks, build_module

    out = Path(args.out) / "".join(c if c.isalnum() else "_" for c in name)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "logger=csv",
                f"data.synthetic.root={args.root}",
                f"+data.synthetic.ocr_min_len={args.min_len}",
                f"+data.synthetic.ocr_max_len={args.max_len}",
                "data.synthetic.train_samples=20000",
                "data.synthetic.heldout_samples=200",
                "+data.synthetic.qtype_weights={ocr: 1.0}",
                f"trainer.max_steps={vlm_steps}",
                f"paths.output_dir={out}",
                "~callbacks.progress_bar",
                "trainer.enable_progress_bar=false",
                "~callbacks.model_checkpoint",
                "~callbacks.export",
                *args.override,
            ],
        )
    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    probe_acc, probe_s = (None, 0.0)
    if probe_steps:  # the tower warm-up stage of train.py (vlm/training/warmup.py)
        from vlm.training.warmup import warm_up_tower

        res = warm_up_tower(
            module.model.encoder,
            dm.media_processor,
            {"steps": probe_steps, "task": args.task, "max_len": max(args.max_len, 1)},
        )
        probe_acc, probe_s = res["accuracy"], res["seconds"]
    t0 = time.time()
    trainer = instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg, True), logger=instantiate(cfg.logger), enable_checkpointing=False
    )
    trainer.fit(module, datamodule=dm)
    vlm_s = time.time() - t0
    metrics = next(out.rglob("metrics.csv"))
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    return {
        "arm": name,
        "probe_steps": probe_steps,
        "probe_acc": probe_acc,
        "probe_s": probe_s,
        "vlm_steps": vlm_steps,
        "vlm_s": vlm_s,
        "loss": statistics.mean(losses[-5:]),
        "ocr": float(trainer.callback_metrics.get("val/acc_ocr", float("nan"))),
        "cer": float(trainer.callback_metrics.get("val/cer_ocr", float("nan"))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe-steps", type=int, default=1000)
    p.add_argument("--vlm-steps", type=int, default=1000)
    p.add_argument(
        "--scratch-extra-steps", type=int, default=600, help="extra VLM steps for the scratch arm (~the probe's time)"
    )
    p.add_argument(
        "--task", default="glyphs", choices=["glyphs", "char"], help="the warm-up task (vlm/training/warmup.py)"
    )
    p.add_argument("--arms", default="pretrained,scratch", help="which arms to run")
    p.add_argument("--min-len", type=int, default=1)
    p.add_argument("--max-len", type=int, default=1)
    p.add_argument("--root", default=None, help="synthvqa OCR data folder (default /tmp/synthvqa_ocr_{min}_{max})")
    p.add_argument("--out", default="/tmp/ocr_tower")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override for both arms, e.g. model/encoder=vit_tiny_rope2d",
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.root = args.root or f"/tmp/synthvqa_ocr_{args.min_len}_{args.max_len}"
    arms = args.arms.split(",")
    rows = []
    if "pretrained" in arms:
        rows.append(run_arm(f"tower warmed up ({args.task})", args, args.probe_steps, args.vlm_steps))
    if "scratch" in arms:
        rows.append(run_arm("from scratch", args, 0, args.vlm_steps + args.scratch_extra_steps))
    print(f"\nsynthvqa OCR, {args.min_len}-{args.max_len} characters, default model (bf16-mixed, batch 16)\n")
    print(
        "| arm | tower probe steps (s) | probe accuracy | VLM steps (s) | last train loss | held-out OCR exact match | CER |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        acc = "-" if r["probe_acc"] is None else f"{100 * r['probe_acc']:.0f}%"
        print(
            f"| {r['arm']} | {r['probe_steps']} ({r['probe_s']:.0f}) | {acc} | {r['vlm_steps']} ({r['vlm_s']:.0f}) | "
            f"{r['loss']:.2f} | {100 * r['ocr']:.1f}% | {100 * r['cer']:.1f}% |"
        )


if __name__ == "__main__":
    main()
