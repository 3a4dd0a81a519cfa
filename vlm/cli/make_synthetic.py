"""Make the synthvqa benchmark (shards + tokenizer + dataset.json); see data/README.md.

    python -m vlm.cli.make_synthetic --out data/synthvqa                      # v1: 60000 train + 1400 heldout
    python -m vlm.cli.make_synthetic --out /tmp/tiny --train-samples 200 --heldout-samples 50
    python -m vlm.cli.make_synthetic --out data/synthvqa_v2 --families v1,v2  # + ocr_wide, multi_image, video
    python -m vlm.cli.make_synthetic --out /tmp/vid --families shapes,video --video-format apng

``--families`` takes family names (shapes, ocr, ocr_wide, multi_image, video) or the aliases
v1, v2, all, comma-separated; the default (v1) writes exactly the v1 benchmark.
``conf/data/synthvqa_v2.yaml`` makes the same v1+v2 data on first use of ``data=synthvqa_v2``.

Re-running with the same options does nothing; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlm.synthvqa import (
    FAMILIES,
    FAMILY_ALIASES,
    QTYPES_ALL,
    VIDEO_FORMATS,
    SynthConfig,
    ensure_synthvqa,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlm.cli.make_synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="data/synthvqa", help="output folder (default: data/synthvqa)")
    p.add_argument("--train-samples", type=int, default=60000)
    p.add_argument("--heldout-samples", type=int, default=1400)
    p.add_argument("--canvas", type=int, default=64, help="image side in pixels")
    p.add_argument("--turns", type=int, default=1, help="questions per shapes image in train (heldout: always 1)")
    p.add_argument("--font-size", type=int, default=None, help="OCR font size (default: derived from the canvas)")
    p.add_argument(
        "--qtype-weights",
        type=json.loads,
        default=None,
        help=f'JSON dict qtype -> weight for train, e.g. \'{{"ocr": 2, "describe": 1}}\'; qtypes: {", ".join(QTYPES_ALL)}',
    )
    p.add_argument(
        "--families",
        default="v1",
        help=f"comma-separated families ({', '.join(FAMILIES)}) or aliases ({', '.join(FAMILY_ALIASES)}); default v1",
    )
    p.add_argument(
        "--video-format",
        choices=sorted(VIDEO_FORMATS),
        default="mp4",
        help="video family member format: mp4 (H.264 via PyAV, lossless) or apng",
    )
    p.add_argument("--video-fps", type=float, default=2.0, help="frame rate written into video members")
    p.add_argument("--video-frames", default="4,8", help="min,max frames per video (default 4,8)")
    p.add_argument("--seed", type=int, default=0, help="train seed")
    p.add_argument("--heldout-seed", type=int, default=1_000_003)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--vocab-size", type=int, default=512)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Make (or finish) the benchmark the arguments describe; its folder."""
    p = build_parser()
    a = p.parse_args(argv)
    try:
        fmin, fmax = (int(v) for v in a.video_frames.split(","))
    except ValueError:
        p.error(f"--video-frames must be MIN,MAX, got {a.video_frames!r}")
    try:
        cfg = SynthConfig(
            canvas=a.canvas,
            turns=a.turns,
            font_size=a.font_size,
            qtype_weights=a.qtype_weights,
            families=a.families,
            video_format=a.video_format,
            video_fps=a.video_fps,
            video_min_frames=fmin,
            video_max_frames=fmax,
        )
    except ValueError as e:
        p.error(str(e))
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
