"""Shards: one split written as ``synthvqa-{split}-%06d.tar`` by a process pool, one seeded
``random.Random`` per shard (so shard ``i`` is byte-identical whatever the number of workers),
and the reader that counts a finished shard back.

Members: ``KEY.json`` (``{"messages", "meta"}``) + ``KEY.0.png`` for v1; v2 samples store one
member per media index (``KEY.{j}.png``, or a video as ``KEY.{j}.mp4`` / ``KEY.{j}.apng``)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from PIL import Image

from vlm.synthvqa.config import SynthConfig
from vlm.synthvqa.samples import get_renderer, make_sample, sample_texts
from vlm.synthvqa.spec import NAME, VERSION, VIDEO_FORMATS


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{NAME}-{split}-{index:06d}.tar"


def shard_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of one shard: a pure function of (name, version, seed, split, index)."""
    digest = hashlib.sha256(f"{NAME}-v{VERSION}/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of ``img`` at a fixed compression level (shard bytes depend on it)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _v2_members(key: str, doc: dict, media: list, cfg: SynthConfig) -> dict:
    sample = {"__key__": key, "json": json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")}
    for j, m in enumerate(media):
        if isinstance(m, Image.Image):
            sample[f"{j}.png"] = encode_png(m)
        else:  # a video: one member holding all frames
            from vlm.data.video import encode_video  # v1 never needs PyAV or torch

            sample[f"{j}.{VIDEO_FORMATS[cfg.video_format]}"] = encode_video(m, cfg.video_fps, cfg.video_format)
    return sample


def _init_worker() -> None:
    """Start of a pool worker: torch (when the parent had imported it, e.g. for the rasteriser)
    gets one intra-op thread. A forked child cannot use the OpenMP thread pool its parent started
    (it hangs), and the rasteriser's tensors are too small to gain from threads anyway."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _write_shard(task: tuple) -> str:
    """Write one shard (a pool task). Writes ``*.tar.tmp`` then renames: a complete ``.tar`` is
    never partial. Returns the path."""
    path, split, index, count, seed, cfg, renderer_name = task
    from webdataset import TarWriter

    tmp = path + ".tmp"
    rng = shard_rng(seed, split, index)
    renderer = get_renderer(renderer_name)
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0, user=NAME, group=NAME, mode=0o444) as sink:
        for i in range(count):
            s = make_sample(rng, cfg, renderer)
            doc = {"messages": s["messages"], "meta": s["meta"]}
            if "media" in s:  # v2 samples: any number of images / videos
                sink.write(_v2_members(f"{split}-{index:06d}-{i:06d}", doc, s["media"], cfg))
                continue
            sink.write(
                {
                    "__key__": f"{split}-{index:06d}-{i:06d}",
                    "json": json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
                    "0.png": encode_png(s["image"]),
                }
            )
    os.replace(tmp, path)
    return path


def write_split(
    out_dir: str | Path,
    split: str,
    n_samples: int,
    seed: int,
    cfg: SynthConfig | Mapping | None = None,
    shard_size: int = 5000,
    workers: int = 1,
    renderer: str = "pil",
) -> list[str]:
    """Write ``out_dir/split/synthvqa-{split}-%06d.tar`` (``ceil(n_samples / shard_size)`` shards,
    one pool task each) and return their paths in order. Shards that already exist are kept
    (they were renamed into place only once complete), so an interrupted run resumes.
    ``renderer`` names what draws the images (``samples.get_renderer``: ``"pil"`` or ``"raster"``)."""
    get_renderer(renderer)  # an unknown name fails here, not in a worker
    if "." in split or "/" in split:
        raise ValueError(f"split name must not contain '.' or '/': {split!r}")
    if shard_size < 1 or n_samples < 0:
        raise ValueError(f"need shard_size >= 1 and n_samples >= 0, got {shard_size}, {n_samples}")
    cfg = SynthConfig.from_any(cfg)
    if cfg.weights.get("ocr", 0) > 0:
        _ = cfg.font_px  # fail here, not in a worker, when the font cannot fit
    if cfg.weights.get("ocr_wide", 0) > 0:
        _ = cfg.wide_font_px
    if cfg.weights.get("video", 0) > 0 and cfg.video_format == "mp4":
        try:
            import av  # noqa: F401
        except ImportError as e:
            raise RuntimeError("synthvqa video_format=mp4 needs PyAV (pip install av), or use video_format=apng") from e
    d = Path(out_dir) / split
    d.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n_samples / shard_size)
    paths = [str(d / shard_name(split, i)) for i in range(n_shards)]
    tasks = [
        (paths[i], split, i, min(shard_size, n_samples - i * shard_size), seed, cfg, renderer)
        for i in range(n_shards)
        if not os.path.exists(paths[i])
    ]
    if len(tasks) < n_shards:
        print(f"[{NAME}] {split}: {n_shards - len(tasks)}/{n_shards} shards already complete", flush=True)
    t0 = time.perf_counter()
    done = 0
    if workers <= 1 or len(tasks) <= 1:
        results: Iterable[str] = map(_write_shard, tasks)
        pool = None
    else:
        # fork, not spawn: spawn re-runs the caller's main script in every worker, which loops
        # forever when that script (unguarded) is what asked for the data. Workers use PIL (and
        # torch for the rasteriser: _init_worker).
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(workers, len(tasks)), initializer=_init_worker)
        results = pool.imap_unordered(_write_shard, tasks)
    try:
        for _ in results:
            done += 1
            print(f"[{NAME}] {split}: shard {done}/{len(tasks)} written ({time.perf_counter() - t0:.1f}s)", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return paths


def scan_shard(path: str | Path) -> dict:
    """Read a shard's JSON members back: sample count, qtype counts, turns, and all texts."""
    n, turns, qtypes, families, texts = 0, 0, Counter(), Counter(), []
    with tarfile.open(path) as tf:
        for member in tf:
            if not member.name.endswith(".json"):
                continue
            doc = json.loads(tf.extractfile(member).read())  # type: ignore[union-attr]
            n += 1
            turns += len(doc["meta"]["qtypes"])
            qtypes.update(doc["meta"]["qtypes"])
            families[doc["meta"]["family"]] += 1
            texts.extend(sample_texts(doc["messages"]))
    return {"samples": n, "turns": turns, "qtypes": qtypes, "families": families, "texts": texts}
