"""Is OCR limited by the tower or by the route to the answer? A causal check on synthvqa OCR.

    python bench/ocr_tower.py                          # 1-character OCR: 1000 + 1000 vs 1600 steps
    python bench/ocr_tower.py --min-len 3 --max-len 6 --vlm-steps 1500

Arm `pretrained tower`: the default ViT first learns to name one character (a max-pool + linear
probe on synthvqa's own OCR rendering, `--probe-steps`, batch 32), then the default VLM with that
tower trains on the OCR family through the real Trainer (`--vlm-steps`). Arm `from scratch`: the
same VLM and data, a fresh tower, and `--vlm-steps` plus as many steps as the probe took in time
(at least as much compute). It prints held-out OCR exact match and the last training loss per arm.
Data are generated under --root (20k training images) on first use. `python train.py
tower_warmup.steps=N` (vlm/warmup.py) is this probe as a training stage (with gradient clipping).
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_tower_to_read(enc, steps: int, min_len: int, seed: int = 123) -> tuple[float, float]:
    """Character naming with a max-pooled linear head (single characters, the synthvqa OCR style).
    Returns (accuracy over the last 100 steps, seconds)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from vlm.data.processor import ImageProcessor
    from vlm.data.synthetic import OCR_CHARSET, SynthConfig, render, sample_ocr_scene

    syn = SynthConfig(canvas=64, ocr_min_len=1, ocr_max_len=1)
    proc = ImageProcessor(patch_size=8, image_size=64, mean=[0.5] * 3, std=[0.5] * 3)
    rng = random.Random(seed)
    head = nn.Linear(enc.out_dim, len(OCR_CHARSET))
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-3)
    grid = torch.tensor([[1, 8, 8]] * 32)
    accs, t0 = [], time.time()
    for _ in range(steps):
        scenes = [sample_ocr_scene(rng, syn) for _ in range(32)]
        x = torch.cat([proc(render(s)).patches for s in scenes])
        y = torch.tensor([OCR_CHARSET.index(s.text) for s in scenes])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = enc(x, grid).float().view(32, 64, -1)
        logits = head(h.max(1).values)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append(float((logits.argmax(1) == y).float().mean()))
    return statistics.mean(accs[-100:]), time.time() - t0


def run_arm(name: str, args, probe_steps: int, vlm_steps: int) -> dict:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from vlm.train import build_callbacks, build_module

    out = Path(args.out) / name.replace(" ", "_")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "logger=csv", f"data.synthetic.root={args.root}", f"+data.synthetic.ocr_min_len={args.min_len}",
            f"+data.synthetic.ocr_max_len={args.max_len}", "data.synthetic.train_samples=20000",
            "data.synthetic.heldout_samples=200", "+data.synthetic.qtype_weights={ocr: 1.0}",
            f"trainer.max_steps={vlm_steps}", f"paths.output_dir={out}", "~callbacks.progress_bar",
            "trainer.enable_progress_bar=false", "~callbacks.model_checkpoint", "~callbacks.export"])
    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    module = build_module(cfg, dm)
    probe_acc, probe_s = (None, 0.0)
    if probe_steps:
        probe_acc, probe_s = train_tower_to_read(module.model.encoder, probe_steps, args.min_len)
    t0 = time.time()
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg, True), logger=instantiate(cfg.logger),
                          enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    vlm_s = time.time() - t0
    metrics = next(out.rglob("metrics.csv"))
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    return {"arm": name, "probe_steps": probe_steps, "probe_acc": probe_acc, "probe_s": probe_s,
            "vlm_steps": vlm_steps, "vlm_s": vlm_s, "loss": statistics.mean(losses[-5:]),
            "ocr": float(trainer.callback_metrics.get("val/acc_ocr", float("nan")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe-steps", type=int, default=1000)
    p.add_argument("--vlm-steps", type=int, default=1000)
    p.add_argument("--scratch-extra-steps", type=int, default=600, help="extra VLM steps for the scratch arm (~the probe's time)")
    p.add_argument("--min-len", type=int, default=1)
    p.add_argument("--max-len", type=int, default=1)
    p.add_argument("--root", default=None, help="synthvqa OCR data folder (default /tmp/synthvqa_ocr_{min}_{max})")
    p.add_argument("--out", default="/tmp/ocr_tower")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.root = args.root or f"/tmp/synthvqa_ocr_{args.min_len}_{args.max_len}"
    rows = [run_arm("pretrained tower", args, args.probe_steps, args.vlm_steps),
            run_arm("from scratch", args, 0, args.vlm_steps + args.scratch_extra_steps)]
    print(f"\nsynthvqa OCR, {args.min_len}-{args.max_len} characters, default model (bf16-mixed, batch 16)\n")
    print("| arm | tower probe steps (s) | probe accuracy | VLM steps (s) | last train loss | held-out OCR exact match |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        acc = "-" if r["probe_acc"] is None else f"{100 * r['probe_acc']:.0f}%"
        print(f"| {r['arm']} | {r['probe_steps']} ({r['probe_s']:.0f}) | {acc} | {r['vlm_steps']} ({r['vlm_s']:.0f}) | "
              f"{r['loss']:.2f} | {100 * r['ocr']:.1f}% |")


if __name__ == "__main__":
    main()
