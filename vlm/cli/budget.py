"""Token budget: how many visual tokens each image / video costs, and what share of the context.

    python -m vlm.cli.budget image=a.png image=b.jpg video=c.mp4 patch_size=14 merge_size=2 context=4096
    python -m vlm.cli.budget size=896x896 size=1568x784 size=224x224 patch_size=14 merge_size=2
    python -m vlm.cli.budget config=outputs/run/export image=a.png        # the processor a model trained with

Arguments are ``key=value`` overrides of conf/budget.yaml (a Hydra app, like ``train.py``); repeat
``image=``, ``video=``, ``size=``, ``video_size=`` or give a list (``'image=[a.png,b.jpg]'``). Rows
come in the order images, videos, sizes, video sizes:

=====================  =========================================================================
``image=PATH``         an image file; only its header is read (EXIF rotation applied, as decoding does)
``video=PATH``         a video file (MP4/MOV, WebM/MKV, AVI, animated GIF/PNG/WebP); header only
``size=WxH``           a hypothetical image of W x H pixels
``video_size=WxHxN``   a hypothetical video: N frames of W x H, optionally ``@FPS`` (default 30)
``config=PATH``        an export folder, its ``config.yaml``, or a YAML/JSON file with a
                       ``processor`` mapping (ImageProcessor keys; video keys under
                       ``processor.video`` or ``video``); its ``template.max_length`` is the context;
                       with a ``model`` mapping (an export's), P, m and T are the model's geometry
                       (``vlm.model.geometry``)
``patch_size``         ViT patch P (default 14)
``merge_size``         projector merge m (default 2): tokens = t·(h/m)·(w/m)
``context``            context length for the share column (default 4096)
``resolution``         ``dynamic`` (default: smart resize, aspect kept) or ``fixed`` (``image_size``²)
``min_pixels`` …       ``max_pixels``, ``min_tokens``, ``max_tokens`` (tokens after merge; pixels =
                       tokens · (P·m)²), ``max_aspect_ratio``, ``image_size``. Without ``config`` and
                       without any of these the caps are OFF: each side is only rounded to a multiple
                       of P·m (the seed's "tracing the token budget" numbers).
``temporal_patch``     frames per temporal patch T (default 2)
``target_fps``         video sampling rate (default 2), ``max_frames`` (default 16),
                       ``max_video_tokens`` per video (default: none)
=====================  =========================================================================

Patches are the vision encoder's sequence length (``t·h·w``, one patch per T frames of a P×P
block); tokens are what the LLM sees (``visual_token_count``, the same function the template and the
model use). Each media span also costs 2 delimiter tokens (``<|vision_start|>``, ``<|vision_end|>``).
Exit status: 0, 1 when an item could not be sized (its row says why), 2 on a bad option.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from PIL import Image

from vlm.build.model import geometry_of
from vlm.cli.app import CONF_PATH, Tool
from vlm.data.media import ALLOWED_FORMATS, MediaError, load_image, strict_pillow
from vlm.data.processor import ImageProcessor
from vlm.data.video import VideoProcessor, probe_video
from vlm.model.projector import visual_token_count

__all__ = ["BudgetRow", "budget", "build_processors", "main", "options"]

CAPS_OFF_MAX_PIXELS = 10**13  # "no cap": far above any real image, still an int for smart_resize
_IMAGE_KEYS = ("resolution", "image_size", "min_pixels", "max_pixels", "max_aspect_ratio", "interpolation")
_VIDEO_KEYS = ("temporal_patch", "target_fps", "max_frames", "max_video_tokens")
_ITEM_KEYS = ("image", "video", "size", "video_size")
DELIMITERS = 2


@dataclass
class BudgetRow:
    """One media item. ``error`` is set (and the numbers are None) when it could not be sized."""

    kind: str  # image | video
    source: str
    input: str = ""
    resized: str = ""
    grid: tuple[int, int, int] | None = None
    patches: int | None = None
    tokens: int | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------ options


def options(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The composed config (conf/budget.yaml) -> (the options given, media items). Items come in
    the order image, video, size, video_size; a key left null is not given."""
    opts: dict[str, Any] = {}
    items: list[tuple[str, str]] = []
    for k, v in cfg.items():
        if v is None:
            continue
        if k in _ITEM_KEYS:
            continue
        opts["target_fps" if k == "fps" else str(k)] = v
    for kind in _ITEM_KEYS:
        v = cfg.get(kind)
        values = [] if v is None else [v] if isinstance(v, (str, int, float)) else list(v)
        items += [(kind, str(x)) for x in values]
    return opts, items


def _num(v: Any) -> Any:
    if isinstance(v, float) and v == float("inf"):  # `max_video_tokens=inf`: no cap
        return None
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("none", "null", "off", "inf"):
            return None
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() else f
    return v


def _load_config(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.yaml"
    if not p.is_file():
        raise ValueError(f"config {path!r}: no such file (an export folder, config.yaml, or a JSON/YAML file)")
    if p.suffix == ".json":
        return json.loads(p.read_text())
    from vlm.checkpoint.files import read_config_file  # a checkpoint's config: capped, no aliases, no interpolation

    return read_config_file(p)


def build_processors(opts: dict[str, Any]) -> tuple[ImageProcessor, VideoProcessor, int, bool]:
    """(image processor, video processor, context length, caps_off) from the parsed options."""
    opts = {k: _num(v) for k, v in opts.items()}
    img_cfg: dict[str, Any] = {}
    vid_cfg: dict[str, Any] = {}
    context = 4096
    from_config = "config" in opts
    if from_config:
        cfg = _load_config(str(opts["config"]))
        proc = dict(cfg.get("processor") or {})
        vid_cfg.update(proc.pop("video", None) or cfg.get("video") or {})
        img_cfg.update({k: v for k, v in proc.items() if k in ImageProcessor().to_config()})
        context = int((cfg.get("template") or {}).get("max_length", context))
        if isinstance(cfg.get("model"), dict):  # the model's geometry is the one source (vlm/model/geometry.py)
            geo = geometry_of(cfg["model"], trusted=False)
            img_cfg.update(patch_size=geo.patch_size, merge_size=geo.merge_size)
            vid_cfg["temporal_patch"] = geo.temporal_patch
    img_cfg.setdefault("patch_size", 14)
    img_cfg.setdefault("merge_size", 2)
    img_cfg.setdefault("resolution", "dynamic")
    for k in ("patch_size", "merge_size", *_IMAGE_KEYS):
        if k in opts:
            img_cfg[k] = opts[k]
    factor = int(img_cfg["patch_size"]) * int(img_cfg["merge_size"])
    if opts.get("min_tokens") is not None:
        img_cfg["min_pixels"] = int(opts["min_tokens"]) * factor * factor
    if opts.get("max_tokens") is not None:
        img_cfg["max_pixels"] = int(opts["max_tokens"]) * factor * factor
    caps_off = not from_config and not any(k in opts for k in ("min_pixels", "max_pixels", "min_tokens", "max_tokens"))
    if img_cfg.get("min_pixels") is None and (caps_off or "min_pixels" in opts or "min_tokens" in opts):
        img_cfg["min_pixels"] = factor * factor
    if img_cfg.get("max_pixels") is None and (caps_off or "max_pixels" in opts or "max_tokens" in opts):
        img_cfg["max_pixels"] = CAPS_OFF_MAX_PIXELS
    if "image_size" not in img_cfg and img_cfg["resolution"] == "fixed":
        img_cfg["image_size"] = 16 * factor
    image = ImageProcessor.from_config(img_cfg)
    if not from_config:
        vid_cfg.setdefault("max_video_tokens", None)
    for k in _VIDEO_KEYS:
        if k in opts:
            vid_cfg[k] = opts[k]
    video = VideoProcessor.from_image_processor(image, **vid_cfg)
    if "context" in opts and opts["context"] is not None:
        context = int(opts["context"])
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")
    return image, video, context, caps_off


# ------------------------------------------------------------------------------------ sizing


def _wxh(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[x×*,]\s*(\d+)\s*", s)
    if not m:
        raise ValueError(f"expected WxH, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def image_header_size(path: str) -> tuple[int, int]:
    """(width, height) an image decodes to, from its header only (EXIF rotation applied)."""
    try:
        with strict_pillow(), Image.open(path, formats=list(ALLOWED_FORMATS)) as img:
            w, h = img.size
            try:
                if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                    w, h = h, w
            except Exception:  # damaged EXIF: decoding ignores it too
                pass
            if w > 0 and h > 0:
                return w, h
    except Exception:
        pass
    img = load_image(path)  # slow path: raises the MediaError that explains the refusal
    return img.size


def _image_row(ip: ImageProcessor, source: str, w: int, h: int) -> BudgetRow:
    row = BudgetRow("image", source, f"{w}x{h}")
    hh, ww = ip.target_size(h, w)
    grid = (1, hh // ip.patch_size, ww // ip.patch_size)
    row.resized, row.grid = f"{ww}x{hh}", grid
    row.patches = grid[0] * grid[1] * grid[2]
    row.tokens = visual_token_count(grid, ip.merge_size)
    return row


def _video_row(vp: VideoProcessor, source: str, w: int, h: int, n: int, fps: float) -> BudgetRow:
    row = BudgetRow("video", source, f"{w}x{h} x{n}f @{fps:g}fps")
    plan = vp.plan(n, fps, h, w)
    row.resized = f"{plan.size[1]}x{plan.size[0]} x{len(plan.indices)}f"
    notes = [s for s, on in (("res lowered", plan.lowered_resolution), ("frames dropped", plan.dropped_frames)) if on]
    if notes:
        row.resized += f" ({', '.join(notes)})"
    row.grid = plan.grid
    row.patches = plan.grid[0] * plan.grid[1] * plan.grid[2]
    row.tokens = plan.tokens
    return row


def budget(items: list[tuple[str, str]], image: ImageProcessor, video: VideoProcessor) -> list[BudgetRow]:
    """One row per ``(kind, value)`` item (``image``/``video`` paths, ``size``/``video_size`` specs)."""
    rows = []
    for kind, value in items:
        source = f"{kind}={value}" if kind in ("size", "video_size") else os.path.basename(value) or value
        try:
            if kind == "size":
                w, h = _wxh(value)
                rows.append(_image_row(image, source, w, h))
            elif kind == "image":
                w, h = image_header_size(value)
                rows.append(_image_row(image, source, w, h))
            elif kind == "video_size":
                m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*(?:@\s*([\d.]+))?\s*", value)
                if not m:
                    raise ValueError(f"expected WxHxFRAMES[@FPS], got {value!r}")
                w, h, n = int(m.group(1)), int(m.group(2)), int(m.group(3))
                rows.append(_video_row(video, source, w, h, n, float(m.group(4) or 30)))
            else:
                info = probe_video(value)
                rows.append(_video_row(video, source, info.width, info.height, info.n_frames, info.fps))
        except (MediaError, ValueError, OSError) as e:
            rows.append(BudgetRow("video" if kind.startswith("video") else "image", source, error=str(e)))
    return rows


# ------------------------------------------------------------------------------------ output


def format_table(
    rows: list[BudgetRow], image: ImageProcessor, video: VideoProcessor, context: int, caps_off: bool
) -> str:
    P, m = image.patch_size, image.merge_size
    if image.resolution == "fixed":
        caps = f"fixed {image.image_size}x{image.image_size}"
    elif caps_off:
        caps = "dynamic, caps off (sides rounded to a multiple of P*m)"
    else:
        caps = f"dynamic, {image.min_pixels}..{image.max_pixels} px ({image.min_pixels // image.factor**2}..{image.max_pixels // image.factor**2} tokens)"
    vb = video.max_video_tokens if video.max_video_tokens is not None else "none"
    lines = [
        f"patch {P}, merge {m}x{m} (factor {P * m}), resolution {caps}, context {context}",
        (
            f"video: temporal_patch {video.temporal_patch}, target_fps {video.target_fps}, max_frames {video.max_frames}, "
            f"max_video_tokens {vb}"
        ),
    ]
    head = ["#", "kind", "source", "input", "resized", "grid (t,h,w)", "patches", "tokens", "context"]
    table = [head]
    for i, r in enumerate(rows, 1):
        if r.error:
            table.append([str(i), r.kind, r.source, "error: " + r.error, "", "", "", "", ""])
            continue
        table.append(
            [
                str(i),
                r.kind,
                r.source,
                r.input,
                r.resized,
                str(r.grid),
                str(r.patches),
                str(r.tokens),
                f"{100 * r.tokens / context:.1f}%",
            ]
        )
    ok = [r for r in rows if not r.error]
    tot_p, tot_t = sum(r.patches for r in ok), sum(r.tokens for r in ok)
    table.append(
        ["", "total", f"{len(ok)} item(s)", "", "", "", str(tot_p), str(tot_t), f"{100 * tot_t / context:.1f}%"]
    )
    widths = [max(len(row[c]) for row in table if not row[3].startswith("error: ") or c < 3) for c in range(len(head))]
    right = {0, 6, 7, 8}
    for k, row in enumerate(table):
        if k == len(table) - 1:
            lines.append("  ".join("-" * w for w in widths))
        if row[3].startswith("error: "):
            lines.append("  ".join(row[c].ljust(widths[c]) for c in range(3)) + "  " + row[3])
            continue
        lines.append(
            "  ".join(
                row[c].rjust(widths[c]) if c in right else row[c].ljust(widths[c]) for c in range(len(head))
            ).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    with_delims = tot_t + DELIMITERS * len(ok)
    lines.append(
        f"with {DELIMITERS} delimiter tokens per item: {with_delims} tokens = {100 * with_delims / context:.1f}% of {context}"
        + ("  -- OVER the context length" if with_delims > context else "")
    )
    return "\n".join(lines)


def run(cfg: DictConfig) -> int:
    """Print the table for the composed config: 0, 1 when an item could not be sized, 2 (one
    `error:` line) on a bad option or nothing to size."""
    try:
        opts, items = options(cfg)
        image, video, context, caps_off = build_processors(opts)
    except (ValueError, MediaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not items:
        print("error: nothing to size; give image=, video=, size=WxH or video_size=WxHxN", file=sys.stderr)
        return 2
    rows = budget(items, image, video)
    print(format_table(rows, image, video, context, caps_off))
    return 1 if any(r.error for r in rows) else 0


USAGE = "python -m vlm.cli.budget image=PATH size=WxH video=PATH video_size=WxHxN[@FPS] [config=EXPORT] [key=value …]"
TOOL = Tool("budget", __doc__, text=("config", *_ITEM_KEYS), repeat=_ITEM_KEYS)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="budget")
def app(cfg: DictConfig) -> None:
    TOOL.run(run, cfg, USAGE)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlm.cli.budget KEY=VALUE …` on `argv` (default: the command line); the exit status."""
    return TOOL.main(app, argv)


if __name__ == "__main__":
    sys.exit(main())
