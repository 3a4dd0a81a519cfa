"""What `python train.py` (the default recipe) reaches: each seed trained by the one command, then
scored on synthvqa's held-out set as drawn by the training renderer (PIL) and by an independent
rasteriser (vlm/synthvqa/render_raster.py). Prints one table per held-out set: exact match (%)
per question type, mean ± spread (min..max) over the seeds, and each seed's wall time.

    python bench/default_recipe.py --seeds 0 1 2 --data-dir data            # ~10-12 min per seed on 2 cores
    python bench/default_recipe.py --seeds 0 --extra trainer.max_steps=200  # a quick look

Run by hand; nothing here is asserted. Extra arguments after --extra go to every train.py run."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # vlm importable without an install


def _run(cmd: list[str]) -> float:
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.time() - t0


def _score(export: Path, data_dir: Path, out: Path) -> dict[str, float]:
    """Exact match (%) per question type of `export` on `data_dir`/synthvqa/heldout."""
    _run(
        [
            sys.executable,
            "infer.py",
            f"ckpt={export}",
            "data=synthvqa_heldout",
            f"paths.data_dir={data_dir}",
            f"out={out}",
            f"hydra.run.dir={out.parent}/hydra-{out.stem}",
        ]
    )
    hits: dict[str, list[bool]] = defaultdict(list)
    for line in out.read_text().splitlines():
        row = json.loads(line)
        hits[row["qtype"]].append(bool(row["correct"]))
    table = {q: 100.0 * sum(v) / len(v) for q, v in hits.items()}
    table["mean"] = statistics.mean(table.values())
    return table


def _raster_heldout(data_dir: Path, root: Path) -> Path:
    """The same held-out scenes and questions as `data_dir`'s, drawn by the rasteriser."""
    from vlm.synthvqa.config import SynthConfig
    from vlm.synthvqa.dataset import ensure_synthvqa

    opts = json.loads((data_dir / "synthvqa" / "dataset.json").read_text())["options"]
    cfg = SynthConfig.from_any({**opts["cfg"], "heldout_renderer": "raster"})
    ensure_synthvqa(
        root / "synthvqa",
        train_samples=64,
        heldout_samples=opts["heldout_samples"],
        cfg=cfg,
        heldout_seed=opts["heldout_seed"],
        workers=1,
    )
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="outputs/bench_default")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    a = ap.parse_args()
    data_dir, out = (ROOT / a.data_dir).resolve(), (ROOT / a.out).resolve()
    results: dict[str, list[dict]] = defaultdict(list)
    walls = []
    for seed in a.seeds:
        run = out / f"seed{seed}"
        cmd = [
            sys.executable,
            "train.py",
            f"seed={seed}",
            f"paths.data_dir={data_dir}",
            f"pipeline.dir={run}",
            f"hydra.run.dir={run}/hydra",
            *a.extra,
        ]
        walls.append(_run(cmd))
        export = run / "02-train" / "export"
        raster = _raster_heldout(data_dir, out / "raster")  # after the first run made the data
        results["PIL (the training renderer)"].append(_score(export, data_dir, run / "pil.jsonl"))
        results["rasteriser (other drawing code)"].append(_score(export, raster, run / "raster.jsonl"))
        print(f"seed {seed}: {walls[-1] / 60:.1f} min", flush=True)
    for name, tables in results.items():
        cols = list(tables[0])
        print(f"\nheld-out drawn by {name}; seeds {a.seeds}; exact match %, mean (min..max)")
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        cells = []
        for c in cols:
            v = [t[c] for t in tables]
            cells.append(f"{statistics.mean(v):.1f} ({min(v):.1f}..{max(v):.1f})" if len(v) > 1 else f"{v[0]:.1f}")
        print("| " + " | ".join(cells) + " |")
    print(f"\nwall time per seed (train.py, both stages): {', '.join(f'{w / 60:.1f}' for w in walls)} min")


if __name__ == "__main__":
    main()
