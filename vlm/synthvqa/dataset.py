"""``ensure_synthvqa``: a whole synthvqa dataset under one root (train and heldout shards, the BPE
tokenizer, ``dataset.json``), made once and resumed when interrupted."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from vlm.synthvqa.config import SynthConfig
from vlm.synthvqa.questions import vocabulary_texts
from vlm.synthvqa.shards import scan_shard, write_split
from vlm.synthvqa.spec import COLORS, FAMILIES, NAME, QTYPES_ALL, VERSION
from vlm.tokenizer import TOKENIZER_REVISION


def _ordered(counts: Counter, order: Iterable[str]) -> dict[str, int]:
    return {k: counts[k] for k in order if counts[k]}


def _options(train_samples, heldout_samples, cfg, seed, heldout_seed, vocab_size, shard_size) -> dict:
    return {
        "name": NAME,
        "version": VERSION,
        "train_samples": int(train_samples),
        "heldout_samples": int(heldout_samples),
        "seed": int(seed),
        "heldout_seed": int(heldout_seed),
        "shard_size": int(shard_size),
        "vocab_size": int(vocab_size),
        "tokenizer_revision": TOKENIZER_REVISION,
        "cfg": cfg.to_dict(),
    }


def _complete(root: Path, options: dict) -> bool:
    try:
        info = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if info.get("options") != options or not (root / info.get("tokenizer", "tokenizer.json")).is_file():
        return False
    return all((root / p).is_file() for s in info.get("splits", {}).values() for p in s.get("shards", []))


def _clear(root: Path) -> None:
    """Remove what a previous run with other options wrote (only files ensure_synthvqa writes)."""
    for name in ("dataset.json", "tokenizer.json", "options.json"):
        (root / name).unlink(missing_ok=True)
    for split in ("train", "heldout"):
        for p in (root / split).glob(f"{NAME}-{split}-*.tar*"):
            p.unlink()


def ensure_synthvqa(
    root: str | Path,
    train_samples: int = 60000,
    heldout_samples: int = 1400,
    cfg: SynthConfig | Mapping | None = None,
    seed: int = 0,
    heldout_seed: int = 1_000_003,
    workers: int = 2,
    vocab_size: int = 512,
    shard_size: int = 5000,
) -> Path:
    """Make synthvqa v1 under ``root`` unless ``root/dataset.json`` already records these options.

    Writes ``root/train/`` (``cfg`` as given, drawn by ``render.py``), ``root/heldout/`` (``cfg`` with
    one turn and uniform qtype weights, seeded by ``heldout_seed``, drawn by the renderer
    ``cfg.heldout_renderer`` names), ``root/tokenizer.json`` (BPE trained on the train
    split's texts plus every word the generator can produce) and, last, ``root/dataset.json``.
    Interrupted runs resume (``root/options.json`` marks which options the partial files belong
    to; files from other options are removed first). Returns ``root``.
    """
    from vlm.tokenizer import train_tokenizer

    root = Path(root)
    cfg = SynthConfig.from_any(cfg)
    options = _options(train_samples, heldout_samples, cfg, seed, heldout_seed, vocab_size, shard_size)
    if _complete(root, options):
        print(f"[{NAME}] {root} is up to date", flush=True)
        return root
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "options.json"
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        previous = None
    if previous != options:
        _clear(root)
        marker.write_text(json.dumps(options, indent=1))
    (root / "dataset.json").unlink(missing_ok=True)

    t0 = time.perf_counter()
    heldout_cfg = dataclasses.replace(cfg, turns=1, qtype_weights=None)
    plan = {
        "train": (train_samples, seed, cfg, "pil"),
        "heldout": (heldout_samples, heldout_seed, heldout_cfg, cfg.heldout_renderer),
    }
    splits: dict[str, dict] = {}
    texts: list[str] = []
    for split, (n, s, c, renderer) in plan.items():
        print(
            f"[{NAME}] writing {split}: {n} samples, canvas {c.canvas}, turns {c.turns}, renderer {renderer} "
            f"-> {root / split}",
            flush=True,
        )
        paths = write_split(root, split, n, s, c, shard_size=shard_size, workers=workers, renderer=renderer)
        stats = [scan_shard(p) for p in paths]
        if split == "train":
            texts = [t for st in stats for t in st["texts"]]
        splits[split] = {
            "samples": sum(st["samples"] for st in stats),
            "turns": sum(st["turns"] for st in stats),
            "families": _ordered(sum((st["families"] for st in stats), Counter()), FAMILIES),
            "qtypes": _ordered(sum((st["qtypes"] for st in stats), Counter()), QTYPES_ALL),
            "shards": [os.path.relpath(p, root) for p in paths],
            "bytes": sum(os.path.getsize(p) for p in paths),
            "cfg": c.to_dict(),
        }
        if splits[split]["samples"] != n:
            raise RuntimeError(f"{split}: expected {n} samples in the shards, found {splits[split]['samples']}")
    print(f"[{NAME}] training the tokenizer on {len(texts)} texts (vocab {vocab_size})", flush=True)
    tok = train_tokenizer(texts + vocabulary_texts(cfg), vocab_size=vocab_size)
    tok.save(root / "tokenizer.json")
    info = {
        "options": options,
        "font_size": cfg.font_px if cfg.weights.get("ocr", 0) > 0 or heldout_samples else None,
        "colors": {k: list(v) for k, v in COLORS.items()},
        "splits": splits,
        "tokenizer": "tokenizer.json",
        "tokenizer_vocab_size": tok.vocab_size,
        "bytes": sum(s["bytes"] for s in splits.values()) + (root / "tokenizer.json").stat().st_size,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = root / "dataset.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, root / "dataset.json")
    print(f"[{NAME}] done in {info['seconds']}s, {info['bytes'] / 1e6:.1f} MB -> {root}", flush=True)
    return root
