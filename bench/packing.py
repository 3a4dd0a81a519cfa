"""Padding with and without sequence packing (`data.packing=true`), on real sample lengths.

    python bench/packing.py                      # synthvqa v1 (and v2 if generated) + a long-tailed mix
    python bench/packing.py --samples 4096 --batch 16

Lengths come from the real pipeline (shards -> SampleTransform -> template), the same numbers the
trainer sees. "Unpacked" right-pads each batch of `--batch` samples to its longest sample;
"packed" packs windows of `--window` samples into rows of `--length` tokens and right-pads each
batch of rows to its longest row (rows per batch = batch · mean length / length, at least 1). The
long-tailed mix is Pareto-distributed lengths (alpha 1.2, capped at the row length), the shape of
real instruction data (many short answers, a few long documents).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm.data.packing import best_fit_decreasing, greedy, padding_fraction  # noqa: E402


def real_lengths(root: Path, n: int) -> list[int]:
    from hydra import compose, initialize_config_dir

    from vlm.build.model import build_processor, build_template, geometry_of
    from vlm.data.sample import SampleTransform
    from vlm.data.webdataset import ShardDataset
    from vlm.tokenizer import TextTokenizer

    data = "synthvqa_v2" if root.name == "synthvqa_v2" else "synthvqa"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        ov = [f"data={data}"] + (["experiment=synthvqa_v2_dynamic"] if data == "synthvqa_v2" else [])
        cfg = compose("train", overrides=ov)
    tok = TextTokenizer.from_file(root / "tokenizer.json")
    geo = geometry_of(cfg.model)
    proc = SampleTransform(
        build_processor(dict(cfg.data.processor), geometry=geo),
        build_template(dict(cfg.data.template), tok, geometry=geo),
    )
    ds = ShardDataset(str(root / "train"), proc, train=False)
    return [s.input_ids.numel() for _, s in zip(range(n), ds)], int(cfg.data.template.max_length)


def report(name: str, lengths: list[int], length: int, batch: int, window: int) -> list[str]:
    rows_per_batch = max(1, round(batch * (sum(lengths) / len(lengths)) / length))
    out = [
        f"| {name} | unpacked | {len(lengths)} | {batch} samples | {100 * padding_fraction([[n] for n in lengths], batch):.1f}% |"
    ]
    for packer in (greedy, best_fit_decreasing):
        t0 = time.perf_counter()
        rows = [
            [lengths[w + i] for i in b]
            for w in range(0, len(lengths), window)
            for b in packer(lengths[w : w + window], length)
        ]
        dt = time.perf_counter() - t0
        pad = padding_fraction(rows, rows_per_batch)
        out.append(
            f"| {name} | {packer.__name__} (rows of {length}) | {len(rows)} rows | {rows_per_batch} rows "
            f"| {100 * pad:.1f}% ({1e6 * dt / len(lengths):.1f} µs/sample to pack) |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    lines = ["| data | batching | samples / rows | per batch | padding |", "| --- | --- | ---: | ---: | ---: |"]
    for root in (ROOT / "data" / "synthvqa", ROOT / "data" / "synthvqa_v2"):
        if (root / "tokenizer.json").is_file():
            lengths, max_len = real_lengths(root, args.samples)
            lines += report(root.name, lengths, max_len, args.batch, args.window)
    rng = random.Random(0)
    tail = [max(8, min(384, int(rng.paretovariate(1.2) * 24))) for _ in range(args.samples)]
    lines += report("long-tailed (Pareto 1.2, ≤384)", tail, 384, args.batch, args.window)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
