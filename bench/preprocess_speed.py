"""Preprocessing speed: raw Pillow decode vs the hardened decoder vs decoder + ImageProcessor.

    python bench/preprocess_speed.py [--repeat 30] [--threads 1]

Prints milliseconds per image (median of ``--repeat`` runs after a warm-up) and the ratio to raw
decode. "gap2" columns use ``reducing_gap=2.0`` (approximate, faster downscaling); "draft" columns
``jpeg_draft=True`` (libjpeg decodes at 1/2..1/8 scale, never below the target; the default config). Images are made
in memory: a 64x64 PNG, a 640x480 "photo-like" JPEG (q90, smooth gradients + shapes + noise) and a
1024x768 JPEG of the same kind. Single-threaded torch by default, as in a DataLoader worker.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.data.media import decode_image  # noqa: E402
from vlm.data.processor import ImageProcessor  # noqa: E402


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / w * 3 + c) * np.cos(yy / h * 2 - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    base += rng.normal(0, 12, size=base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def time_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def raw_decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.load()
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    inputs = {
        "64x64 PNG": encode(photo_like(64, 64, 1), "PNG"),
        "640x480 JPEG q90": encode(photo_like(640, 480, 2), "JPEG", quality=90),
        "1024x768 JPEG q90": encode(photo_like(1024, 768, 3), "JPEG", quality=90),
    }
    processors = {
        "+proc fixed64/p8": ImageProcessor(patch_size=8, image_size=64),
        "+proc fixed224/p14": ImageProcessor(patch_size=14, image_size=224),
        "+proc 64/p8 gap2": ImageProcessor(patch_size=8, image_size=64, reducing_gap=2.0),
        "+proc 224/p14 gap2": ImageProcessor(patch_size=14, image_size=224, reducing_gap=2.0),
        "+proc 64/p8 draft": ImageProcessor(patch_size=8, image_size=64, jpeg_draft=True),
        "+proc 224/p14 draft": ImageProcessor(patch_size=14, image_size=224, jpeg_draft=True),
    }

    print(
        f"# python {platform.python_version()}, torch {torch.__version__}, "
        f"pillow {Image.__version__}, torch threads {torch.get_num_threads()}, median of {args.repeat}"
    )
    cols = ["raw PIL", "decode_image"] + list(processors)
    header = f"{'input':<20} {'bytes':>8} " + " ".join(f"{c:>20}" for c in cols)
    print(header)
    print("-" * len(header))
    for name, data in inputs.items():
        raw = time_ms(lambda: raw_decode(data), args.repeat)
        row = {"raw PIL": raw, "decode_image": time_ms(lambda: decode_image(data), args.repeat)}
        for pname, proc in processors.items():
            draft = proc.draft_size if proc.jpeg_draft else None
            row[pname] = time_ms(lambda: proc(decode_image(data, draft=draft)), args.repeat)
        cells = [f"{row[c]:8.3f} ms ({row[c] / raw:4.2f}x)" for c in cols]
        print(f"{name:<20} {len(data):>8} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
