"""Data throughput: the training loader on shards of realistic JPEGs, and a large conversion.

    python bench/data_throughput.py                               # 400 x 640x480 JPEG q90, workers 0 1 2
    python bench/data_throughput.py --samples 200 --workers 0 2
    python bench/data_throughput.py --convert-samples 100000      # big caption conversion: seconds, peak RSS
    python bench/data_throughput.py --convert-samples 100000 --work-dir /tmp/conv --interrupt-after 5

Loader mode. Makes ``--samples`` "photo-like" 640x480 JPEGs (smooth colour gradients + noise +
random ellipses/rectangles, quality 90) and caption records in a temp folder, turns them into shards
with ``vlm.convert.convert_captions`` (so the shards are exactly what users get), then reports:

* samples/s and images/s through the project's loader (``ShardDataset(train=False)`` + ``DataLoader``
  with the project's ``Collator``, batch ``--batch-size``, prefetch 4) for each ``--workers`` count:
  the whole pass including worker start-up, and the rate after the first batch;
* the raw Pillow decode rate of the same files (``Image.open(BytesIO(b)).convert("RGB")``), one
  process; and the per-image cost of the project's preprocessing (``decode_image`` +
  ``ImageProcessor`` at the default fixed 64 px / patch 8) next to it, with the ratio.

Convert mode (``--convert-samples N``). Writes ``N`` caption records (JSONL) that cycle over
``--distinct-images`` small JPEGs, with a few broken rows (every 1000th a missing image, every 997th
an empty caption), runs ``data/convert_captions.py`` as a child process and reports seconds,
samples/s and peak RSS (main and writer processes, from the converter's own ``dataset.json``).
``--interrupt-after S`` sends the converter SIGINT (Ctrl-C) after S seconds, then runs the same command
again and reports how many shards were reused. With ``--work-dir`` the input and shards persist, so
you can also interrupt by hand and re-run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm.convert import DEFAULT_CAPTION_PROMPTS, convert_captions  # noqa: E402
from vlm.data.media import decode_image  # noqa: E402


def photo_like(rng: np.random.Generator, w: int = 640, h: int = 480) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = rng.uniform(0, 6.3, size=3)
    f = rng.uniform(1, 5, size=2)
    base = np.stack([128 + 100 * np.sin(xx / w * f[0] + p) * np.cos(yy / h * f[1] - p) for p in ph], axis=-1)
    base += rng.normal(0, 12, size=base.shape).astype(np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, max(11, w // 3))), y0 + int(rng.integers(10, max(11, h // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return img


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "photo",
    "of",
    "with",
    "and",
    "on",
    "near",
    "bright",
    "dark",
    "shape",
    "circle",
    "square",
    "scene",
]


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16)))).capitalize() + "."


# --------------------------------------------------------------------------------- loader


def make_loader_data(tmp: Path, n: int, maxcount: int, seed: int = 0) -> tuple[Path, list[bytes], list[str]]:
    rng = np.random.default_rng(seed)
    (tmp / "img").mkdir()
    files, caps = [], []
    with open(tmp / "pairs.jsonl", "w") as f:
        for i in range(n):
            data = jpeg(photo_like(rng))
            (tmp / "img" / f"{i:06d}.jpg").write_bytes(data)
            files.append(data)
            caps.append(caption(rng))
            f.write(json.dumps({"image": f"img/{i:06d}.jpg", "caption": caps[-1]}) + "\n")
    rep = convert_captions(tmp / "pairs.jsonl", tmp / "shards", maxcount=maxcount, workers=2, verbose=False)
    print(
        f"made {n} JPEGs (640x480 q90, mean {sum(map(len, files)) / n / 1e3:.0f} kB) -> {len(rep['shards'])} shards "
        f"in {rep['run']['seconds']:.1f}s conversion ({rep['samples'] / rep['run']['seconds']:.0f} samples/s, 2 workers)"
    )
    return tmp / "shards", files, caps


def loader_rate(shards: Path, caps: list[str], workers: int, batch_size: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from vlm.data.collate import Collator
    from vlm.data.processor import ImageProcessor
    from vlm.data.sample import SampleTransform
    from vlm.data.template import ChatTemplate
    from vlm.data.webdataset import ShardDataset, seed_worker
    from vlm.model.projector import visual_token_count
    from vlm.tokenizer import train_tokenizer

    tok = train_tokenizer(caps + list(DEFAULT_CAPTION_PROMPTS) + ["user\n", "assistant\n"])
    template = ChatTemplate(tok, lambda g: visual_token_count(g, 1), max_length=256)
    # the default config's processor: fixed 64 px, patch 8, jpeg_draft on
    proc = SampleTransform(ImageProcessor(jpeg_draft=True), template, mode="train")
    ds = ShardDataset(str(shards), proc, train=False)
    dl = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=Collator(tok.pad_id),
        prefetch_factor=4 if workers else None,
        worker_init_fn=seed_worker if workers else None,
    )
    t0 = time.perf_counter()
    t_first = None
    samples = images = first_n = 0
    for batch in dl:
        n = batch["input_ids"].shape[0]
        samples += n
        images += int(batch["media_per_sample"].sum())
        if t_first is None:
            t_first, first_n = time.perf_counter(), n
    total = time.perf_counter() - t0
    steady = time.perf_counter() - t_first
    return {
        "workers": workers,
        "samples": samples,
        "images": images,
        "seconds": total,
        "sps": samples / total,
        "ips": images / total,
        "steady_sps": (samples - first_n) / steady if steady > 0 else float("nan"),
        "threads": torch.get_num_threads(),
    }


def per_image_ms(files: list[bytes], fn) -> float:
    fn(files[0])  # warm-up
    t0 = time.perf_counter()
    for b in files:
        fn(b)
    return (time.perf_counter() - t0) / len(files) * 1e3


def run_loader(args) -> None:
    import torch

    from vlm.data.processor import ImageProcessor

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as d:
        shards, files, caps = make_loader_data(Path(d), args.samples, args.maxcount)
        rows = [loader_rate(shards, caps, w, args.batch_size) for w in args.workers]

        def raw(b):
            return Image.open(io.BytesIO(b)).convert("RGB")

        proc = ImageProcessor()
        proc_gap = ImageProcessor(reducing_gap=2.0)
        proc_draft = ImageProcessor(jpeg_draft=True)
        raw_ms = per_image_ms(files, raw)
        dec_ms = per_image_ms(files, lambda b: decode_image(b))
        pre_ms = per_image_ms(files, lambda b: proc(decode_image(b)))
        gap_ms = per_image_ms(files, lambda b: proc_gap(decode_image(b)))
        draft_ms = per_image_ms(files, lambda b: proc_draft(decode_image(b, draft=proc_draft.draft_size)))

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
        f"batch {args.batch_size}, {args.samples} samples (1 image each)\n"
    )
    print("| loader workers | samples/s | images/s | after 1st batch samples/s | pass (s) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['workers']} | {r['sps']:.0f} | {r['ips']:.0f} | {r['steady_sps']:.0f} | {r['seconds']:.2f} |")
    print(f"| raw PIL decode (1 process) | {1e3 / raw_ms:.0f} | {1e3 / raw_ms:.0f} | | |")
    print("\n| per image (640x480 JPEG q90) | ms | x raw decode |")
    print("| --- | ---: | ---: |")
    for label, ms in [
        ("raw PIL: Image.open(BytesIO(b)).convert('RGB')", raw_ms),
        ("decode_image (hardened)", dec_ms),
        ("decode_image + ImageProcessor (fixed 64 px, patch 8)", pre_ms),
        ("decode_image + ImageProcessor(reducing_gap=2.0)", gap_ms),
        ("decode_image(draft) + ImageProcessor(jpeg_draft=True) (the default config)", draft_ms),
    ]:
        print(f"| {label} | {ms:.2f} | {ms / raw_ms:.2f} |")


# -------------------------------------------------------------------------------- convert


def make_convert_input(work: Path, n: int, distinct: int, seed: int = 0) -> Path:
    src = work / "pairs.jsonl"
    marker = work / "input.json"
    want = {"samples": n, "distinct": distinct, "seed": seed}
    if src.is_file() and marker.is_file() and json.loads(marker.read_text()) == want:
        return src
    rng = np.random.default_rng(seed)
    (work / "img").mkdir(parents=True, exist_ok=True)
    k = min(n, distinct)
    for i in range(k):
        (work / "img" / f"{i:05d}.jpg").write_bytes(jpeg(photo_like(rng, 64, 48)))
    t0 = time.perf_counter()
    with open(src, "w") as f:
        for i in range(n):
            img = f"img/{i % k:05d}.jpg" if i % 1000 != 999 else "img/missing.jpg"
            cap = caption(rng) if i % 997 != 996 else ""
            f.write(json.dumps({"image": img, "caption": cap}) + "\n")
    marker.write_text(json.dumps(want))
    print(
        f"wrote {n} records ({src.stat().st_size / 1e6:.1f} MB JSONL, {k} distinct 64x48 JPEGs) in {time.perf_counter() - t0:.1f}s"
    )
    return src


def run_convert(args) -> None:
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="vlm-convert-")
        work = Path(tmp.name)
    try:
        src = make_convert_input(work, args.convert_samples, args.distinct_images)
        out = work / "shards"
        cmd = [
            sys.executable,
            str(ROOT / "data" / "convert_captions.py"),
            str(src),
            "--out",
            str(out),
            "--maxcount",
            str(args.maxcount),
            "--workers",
            str(args.convert_workers),
            "--quiet",
        ]
        print("$ " + " ".join(cmd))
        runs = []
        if args.interrupt_after:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
            try:
                p.wait(timeout=args.interrupt_after)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
                p.wait()
            done = len(list(out.glob("captions-*.json"))) if out.exists() else 0
            runs.append(("interrupted", time.perf_counter() - t0, p.returncode, done))
            print(f"interrupted after {args.interrupt_after}s: exit {p.returncode}, {done} shard reports on disk")
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        print(rc.stdout.strip())
        if rc.returncode:
            print(rc.stderr, file=sys.stderr)
            raise SystemExit(rc.returncode)
        info = json.loads((out / "dataset.json").read_text())
        n = args.convert_samples
        expected = {}
        for i in range(n):  # the caption is checked before the image
            reason = "empty_caption" if i % 997 == 996 else "media_missing" if i % 1000 == 999 else None
            if reason:
                expected[reason] = expected.get(reason, 0) + 1
        expect_skipped = dict(sorted(expected.items()))
        ok = info["samples"] == n - sum(expect_skipped.values()) and info["skipped"] == expect_skipped
        run = info["run"]
        chunks = -(-info["records"] // args.maxcount)
        print(
            "\n| conversion | records | samples | skipped | shards | MB | s | samples/s | peak RSS main (MB) | peak RSS writers (MB) |"
        )
        print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        label = "resumed run" if runs else "full run"
        print(
            f"| {label} ({run['shards_written']} written, {run['shards_reused']} reused, {args.convert_workers} workers) "
            f"| {info['records']} | {info['samples']} | {info['skipped']} | {len(info['shards'])} | {info['bytes'] / 1e6:.0f} "
            f"| {seconds:.1f} | {info['records'] * run['shards_written'] / chunks / max(seconds, 1e-9):.0f} "
            f"| {run['peak_rss_mb']['main']} | {run['peak_rss_mb']['workers']} |"
        )
        print(f"\ncounts as generated: {'yes' if ok else 'NO'} (expected skipped {expect_skipped})")
    finally:
        if tmp is not None:
            tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400, help="loader mode: JPEGs to make")
    ap.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="loader mode: DataLoader num_workers to try"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--maxcount", type=int, default=100, help="samples per shard (loader mode), 1000 in convert mode")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    ap.add_argument("--convert-samples", type=int, default=0, help="convert mode: records to convert")
    ap.add_argument("--convert-workers", type=int, default=2)
    ap.add_argument(
        "--distinct-images", type=int, default=1000, help="convert mode: image files the records cycle over"
    )
    ap.add_argument("--work-dir", default=None, help="convert mode: keep input and shards here (resumable by hand)")
    ap.add_argument(
        "--interrupt-after",
        type=float,
        default=0,
        help="convert mode: SIGINT the converter after this many seconds, then resume",
    )
    args = ap.parse_args()
    if args.convert_samples:
        if args.maxcount == 100:
            args.maxcount = 1000
        run_convert(args)
    else:
        run_loader(args)


if __name__ == "__main__":
    main()
