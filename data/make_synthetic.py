#!/usr/bin/env python
"""Make the synthvqa v1 benchmark (shards + tokenizer + dataset.json); see data/README.md.

    python data/make_synthetic.py --out data/synthvqa                      # 60000 train + 1400 heldout
    python data/make_synthetic.py --out /tmp/tiny --train-samples 200 --heldout-samples 50

Re-running with the same options does nothing; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm.data.synthetic import QTYPES, SynthConfig, ensure_synthvqa


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/synthvqa", help="output folder (default: data/synthvqa)")
    p.add_argument("--train-samples", type=int, default=60000)
    p.add_argument("--heldout-samples", type=int, default=1400)
    p.add_argument("--canvas", type=int, default=64, help="image side in pixels")
    p.add_argument("--turns", type=int, default=1, help="questions per shapes image in train (heldout: always 1)")
    p.add_argument("--font-size", type=int, default=None, help="OCR font size (default: derived from the canvas)")
    p.add_argument("--qtype-weights", type=json.loads, default=None,
                   help=f'JSON dict qtype -> weight for train, e.g. \'{{"ocr": 2, "describe": 1}}\'; qtypes: {", ".join(QTYPES)}')
    p.add_argument("--seed", type=int, default=0, help="train seed")
    p.add_argument("--heldout-seed", type=int, default=1_000_003)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--vocab-size", type=int, default=512)
    a = p.parse_args(argv)
    cfg = SynthConfig(canvas=a.canvas, turns=a.turns, font_size=a.font_size, qtype_weights=a.qtype_weights)
    return ensure_synthvqa(
        a.out,
        train_samples=a.train_samples,
        heldout_samples=a.heldout_samples,
        cfg=cfg,
        seed=a.seed,
        heldout_seed=a.heldout_seed,
        workers=a.workers,
        vocab_size=a.vocab_size,
        shard_size=a.shard_size,
    )


if __name__ == "__main__":
    main()
