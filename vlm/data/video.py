"""Video → frames → temporal patches + grid: the video half of the "processed media" contract.

Decoding (:func:`decode_video`, :func:`probe_video`) is hardened like :mod:`vlm.data.media`: it
returns RGB :class:`PIL.Image.Image` frames or raises :class:`~vlm.data.media.MediaError` with a
short ``reason``:

==================  ==========================================================================
reason              meaning
==================  ==========================================================================
``empty``           zero bytes, or a stream that decodes to no frame
``unidentified``    not a container we accept (sniffed from magic bytes, never the file name),
                    or a container without a video stream
``corrupt``         starts like an accepted container but cannot be opened or decoded, or ends
                    before the frames its header promised
``too_many_pixels`` frame ``width * height`` (read from the stream header, before any frame is
                    decoded) above ``max_pixels``, or all frames together above
                    ``max_total_pixels`` when every frame is kept
``too_many_frames`` more frames than ``max_frames_decoded`` (header or count while decoding)
``bad_size``        zero width/height, or frames of different sizes in a frame list
==================  ==========================================================================

Accepted inputs, by their magic bytes: MP4/MOV (``ftyp``), Matroska/WebM, AVI -- demuxed and decoded
with PyAV (FFmpeg), the container format named explicitly so FFmpeg never probes for one (its
playlist/concat demuxers can open other files) -- and animated GIF / PNG (APNG) / WebP, decoded
with Pillow (every frame; a still image is a 1-frame video). A list of frame images (bytes or PIL)
is a video too: :func:`frames_from_images`.

Sampling (:func:`sample_frames`, Qwen2-VL style): ``n = round(n_frames * target_fps / fps)``
frames, at least 1 and at most ``n_frames``; ``n`` rounded (half up) to a multiple of
``temporal_patch`` and at least ``temporal_patch``; capped at ``max_frames`` (rounded down to a
multiple of ``temporal_patch``); the distinct frames are spread evenly over the clip
(``linspace(0, n_frames - 1, k)`` rounded), and when the clip has fewer frames than ``n`` the last
one is repeated to fill the temporal patch.

Token budget (:class:`VideoProcessor`): the video gets at most ``max_video_tokens`` LLM tokens
(``visual_token_count(grid, merge)``, the one function the template and the model use). In order:

1. Sample the frames, resize each frame by the image rule (:func:`smart_resize`, same
   ``factor = patch * merge``, per-frame ``[min_pixels, max_pixels]``).
2. Over budget → lower the per-frame resolution (smart resize with ``max_pixels`` lowered to
   ``floor(budget / t) * factor²``), but not below ``min_pixels``.
3. Still over at the minimum resolution → drop frames (resample evenly with fewer frames,
   ``t = floor(budget / tokens_at_min)``, at least one temporal patch); then raise the resolution
   again as far as the budget allows with those frames.
4. One temporal patch at ``min_pixels`` still over budget → go below ``min_pixels`` (the budget is
   a hard cap, ``min_pixels`` a soft floor, as in :func:`smart_resize`).

Layout. Frames ``x [n, C, H, W]`` (n a multiple of T) are grouped into ``t = n / T`` temporal
patches. Patch ``(g, i, j)`` is ``x[g*T:(g+1)*T, :, i*P:(i+1)*P, j*P:(j+1)*P]`` permuted to
``[C, T, P, P]`` and flattened -- channel-major, then time, then the P x P pixels: the layout of a
``Conv3d(C, D, (T, P, P), stride=(T, P, P))`` weight ``[D, C, T, P, P]`` (Qwen2-VL's layout), so a
patch-embedding ``Linear(C*T*P*P, D)`` and that Conv3d are interchangeable. Patches are ordered
``g``-major, then row-major over ``(i, j)``: ``patches [t*h*w, C*T*P*P]``, ``grid (t, h, w)``.
With ``T = 1`` a patch is exactly the image layout of :mod:`vlm.data.processor` (``[C, P, P]``),
so an image is a 1-frame video; with ``T > 1`` an image can join a video encoder by repeating it
``T`` times (:func:`repeat_temporal`, what Qwen2-VL does). Images themselves stay ``[n, C*P*P]``.

Variable frame rate videos are sampled by frame index with the stream's average rate: fine for
the uniform sampling above, not exact in time.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from PIL import Image, ImageSequence

from vlm.data.media import MediaError, decode_image, read_file, strict_pillow, to_rgb
from vlm.data.processor import INTERPOLATIONS, ImageProcessor, smart_resize
from vlm.model.projector import visual_token_count

__all__ = [
    "ProcessedVideo",
    "VideoInfo",
    "VideoPlan",
    "VideoProcessor",
    "decode_video",
    "encode_video",
    "frames_from_images",
    "patchify_video",
    "probe_video",
    "repeat_temporal",
    "sample_frames",
    "unpatchify_video",
]

#: Container magic → (kind, FFmpeg demuxer name or Pillow format).
_PYAV_FORMATS = {"mp4": "mov", "matroska": "matroska", "avi": "avi"}
DEFAULT_FPS = 2.0  # frame rate assumed for frame lists and animated images without timing


def _sniff(head: bytes) -> tuple[str, str] | None:
    """``("pyav", demuxer)`` / ``("pillow", format)`` from the first bytes, or None."""
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "pyav", _PYAV_FORMATS["mp4"]
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "pyav", _PYAV_FORMATS["matroska"]
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "pyav", _PYAV_FORMATS["avi"]
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "pillow", "GIF"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "pillow", "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "pillow", "WEBP"
    return None


# ------------------------------------------------------------------------------------ sampling


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def sample_frames(
    n_frames: int,
    fps: float | None,
    target_fps: float | None = 2.0,
    max_frames: int = 16,
    temporal_patch: int = 2,
) -> list[int]:
    """Source frame indices to keep (rule in the module docstring). Length is a positive multiple
    of ``temporal_patch``; indices are non-decreasing and repeat only as end padding.

    ``fps`` or ``target_fps`` None / non-positive / non-finite: take every frame (up to the cap).
    """
    n_frames, T = int(n_frames), int(temporal_patch)
    if n_frames < 1:
        raise ValueError(f"cannot sample frames from a video of {n_frames} frames")
    if T < 1:
        raise ValueError(f"temporal_patch must be >= 1, got {temporal_patch}")
    cap = max(T, (int(max_frames) // T) * T)
    ok = lambda v: v is not None and math.isfinite(float(v)) and float(v) > 0
    n = _round_half_up(n_frames * float(target_fps) / float(fps)) if ok(fps) and ok(target_fps) else n_frames
    n = max(1, min(n, n_frames))
    n = min(cap, max(T, _round_half_up(n / T) * T))
    k = min(n, n_frames)  # distinct frames; the rest is padding with the last one
    if k == 1:
        idx = [0]
    else:  # round(i * (N - 1) / (k - 1)), half up, in exact integers
        idx = [(2 * i * (n_frames - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]
    return idx + [idx[-1]] * (n - k)


# ------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class VideoInfo:
    """Header facts: frame ``width``, ``height``, ``n_frames`` (from the header, else by counting
    packets, never by decoding), ``fps`` (average rate; DEFAULT_FPS when unknown), ``format``."""

    width: int
    height: int
    n_frames: int
    fps: float
    format: str


class _CallerError(ValueError):
    """Bad ``indices`` from the caller: a programming error, not bad media (never wrapped)."""


def _check_bytes(data: Any, key: str | None) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected video bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise MediaError("empty", "zero bytes", key=key)


def _identify(data, key: str | None) -> tuple[str, str]:
    kind = _sniff(bytes(data[:16]))
    if kind is None:
        raise MediaError(
            "unidentified", "not a video (accepted: MP4/MOV, Matroska/WebM, AVI, animated GIF/PNG/WebP)", key=key
        )
    return kind


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a dependency
        raise MediaError("unsupported", "PyAV is not installed (pip install av)") from e
    return av


@contextmanager
def _open_pyav(data, demuxer: str, key: str | None, threads: int) -> Iterator[tuple[Any, Any, VideoInfo]]:
    av = _import_av()
    try:
        container = av.open(io.BytesIO(bytes(data)), mode="r", format=demuxer)
    except av.error.FFmpegError as e:
        raise MediaError("corrupt", f"starts like {demuxer} but cannot be opened: {e}", key=key) from e
    try:
        if not container.streams.video:
            raise MediaError("unidentified", f"{demuxer} container without a video stream", key=key)
        stream = container.streams.video[0]
        stream.codec_context.thread_count = max(1, int(threads))
        w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not (math.isfinite(fps) and fps > 0):
            fps = DEFAULT_FPS
        n = int(stream.frames or 0)
        if n <= 0:  # e.g. Matroska: count packets (demux only, no decoding), then rewind
            n = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
        yield container, stream, VideoInfo(w, h, n, fps, demuxer)
    finally:
        container.close()


def probe_video(data: bytes | bytearray | memoryview | str | os.PathLike, *, key: str | None = None) -> VideoInfo:
    """Header facts of a video (bytes or a path) without decoding a frame."""
    if isinstance(data, (str, os.PathLike)):
        key = key or os.fspath(data)
        data = read_file(data, key=key)
    _check_bytes(data, key)
    kind, fmt = _identify(data, key)
    if kind == "pillow":
        with strict_pillow():
            try:
                img = Image.open(io.BytesIO(bytes(data)), formats=[fmt])
            except Exception as e:
                raise MediaError("corrupt", f"starts like {fmt} but its header cannot be read: {e}", key=key) from e
            n = int(getattr(img, "n_frames", 1))
            return VideoInfo(img.width, img.height, n, _pillow_fps(img), fmt)
    try:
        with _open_pyav(data, fmt, key, threads=1) as (_, _, info):
            return info
    except MediaError:
        raise
    except Exception as e:
        raise MediaError("corrupt", f"{type(e).__name__}: {e}", key=key) from e


def _pillow_fps(img: Image.Image) -> float:
    ms = img.info.get("duration")
    try:
        ms = float(ms)
    except (TypeError, ValueError):
        return DEFAULT_FPS
    return 1000.0 / ms if ms > 0 and math.isfinite(ms) else DEFAULT_FPS


def decode_video(
    data: bytes | bytearray | memoryview,
    *,
    key: str | None = None,
    max_pixels: int = 50_000_000,
    max_frames_decoded: int = 4096,
    max_total_pixels: int = 600_000_000,
    indices: Sequence[int] | Callable[[VideoInfo], Sequence[int]] | None = None,
    threads: int = 1,
) -> tuple[list[Image.Image], float]:
    """Decode a video into RGB frames and its frame rate, or raise :class:`MediaError`.

    ``indices`` (source frame indices, or a function of the :class:`VideoInfo` returning them):
    keep only those frames, in that order (repeats allowed); decoding stops after the last one
    needed. ``None`` keeps every frame, refused (``too_many_pixels``) when ``n_frames * width *
    height`` exceeds ``max_total_pixels``. ``max_pixels`` bounds one frame, checked on the header
    before decoding; ``max_frames_decoded`` bounds how many frames may be decoded at all.
    ``threads``: FFmpeg decoder threads (1 suits data-loader workers).
    """
    _check_bytes(data, key)
    if max_pixels <= 0 or max_frames_decoded <= 0:
        raise ValueError("max_pixels and max_frames_decoded must be positive")
    kind, fmt = _identify(data, key)
    try:
        if kind == "pillow":
            with strict_pillow():
                return _decode_pillow(data, fmt, key, max_pixels, max_frames_decoded, max_total_pixels, indices)
        with _open_pyav(data, fmt, key, threads) as (container, stream, info):
            return _decode_pyav(container, stream, info, key, max_pixels, max_frames_decoded, max_total_pixels, indices)
    except (MediaError, _CallerError):
        raise
    except Image.DecompressionBombError as e:
        raise MediaError("too_many_pixels", str(e), key=key) from e
    except Exception as e:  # anything a decoder throws: the data is bad
        raise MediaError("corrupt", f"{type(e).__name__}: {e}", key=key) from e


def _check_header(info: VideoInfo, key, max_pixels, max_frames_decoded, max_total_pixels, indices) -> list[int] | None:
    if info.width <= 0 or info.height <= 0:
        raise MediaError("bad_size", f"{info.format} header says {info.width}x{info.height}", key=key)
    if info.width * info.height > max_pixels:
        raise MediaError(
            "too_many_pixels",
            f"{info.format} frames are {info.width}x{info.height} = {info.width * info.height} pixels > max_pixels={max_pixels}",
            key=key,
        )
    if info.n_frames > max_frames_decoded:
        raise MediaError(
            "too_many_frames", f"{info.n_frames} frames > max_frames_decoded={max_frames_decoded}", key=key
        )
    if info.n_frames <= 0:
        raise MediaError("empty", f"{info.format} stream has no frames", key=key)
    if callable(indices):
        indices = indices(info)
    if indices is None:
        if info.n_frames * info.width * info.height > max_total_pixels:
            raise MediaError(
                "too_many_pixels",
                f"{info.n_frames} frames of {info.width}x{info.height} > max_total_pixels={max_total_pixels}; "
                "pass indices to keep fewer frames",
                key=key,
            )
        return None
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise _CallerError(f"indices must be a non-empty list of non-negative frame numbers, got {indices}")
    if max(indices) >= info.n_frames:
        raise _CallerError(f"frame index {max(indices)} out of range for {info.n_frames} frames")
    return indices


def _select(frames: dict[int, Image.Image] | list[Image.Image], indices: list[int] | None) -> list[Image.Image]:
    if indices is None:
        return list(frames)  # type: ignore[arg-type]
    return [frames[i] for i in indices]


def _decode_pyav(container, stream, info, key, max_pixels, max_frames_decoded, max_total_pixels, indices):
    indices = _check_header(info, key, max_pixels, max_frames_decoded, max_total_pixels, indices)
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices)
    kept: dict[int, Image.Image] = {}
    n = 0
    for frame in container.decode(stream):
        if n >= max_frames_decoded:
            raise MediaError("too_many_frames", f"more than max_frames_decoded={max_frames_decoded} frames", key=key)
        if frame.width * frame.height > max_pixels:  # a size change mid-stream
            raise MediaError(
                "too_many_pixels", f"frame {n} is {frame.width}x{frame.height} > max_pixels={max_pixels}", key=key
            )
        if wanted is None or n in wanted:
            kept[n] = frame.to_image()  # rgb24 PIL image, native size
        n += 1
        if last is not None and n > last:
            break
    if n == 0:
        raise MediaError("empty", f"{info.format} stream decoded to no frames", key=key)
    if n < (info.n_frames if last is None else last + 1):
        raise MediaError("corrupt", f"stream ended after {n} of {info.n_frames} frames", key=key)
    return _select(kept if indices is not None else [kept[i] for i in range(n)], indices), info.fps


def _decode_pillow(data, fmt, key, max_pixels, max_frames_decoded, max_total_pixels, indices):
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=[fmt])
    except Exception as e:
        raise MediaError("corrupt", f"starts like {fmt} but its header cannot be read: {e}", key=key) from e
    info = VideoInfo(img.width, img.height, int(getattr(img, "n_frames", 1)), _pillow_fps(img), fmt)
    indices = _check_header(info, key, max_pixels, max_frames_decoded, max_total_pixels, indices)
    wanted = None if indices is None else set(indices)
    kept: dict[int, Image.Image] = {}
    for n, frame in enumerate(ImageSequence.Iterator(img)):
        if indices is not None and n > max(indices):
            break
        if wanted is None or n in wanted:
            frame.load()
            rgb = to_rgb(frame)
            kept[n] = rgb.copy() if rgb is frame else rgb  # detach from the shared file object
    if not kept:
        raise MediaError("empty", f"{fmt} decoded to no frames", key=key)
    order = indices if indices is not None else sorted(kept)
    return [kept[i] for i in order], info.fps


def frames_from_images(
    items: Sequence[bytes | bytearray | memoryview | Image.Image],
    *,
    key: str | None = None,
    max_pixels: int = 50_000_000,
) -> list[Image.Image]:
    """A list of frame images (encoded bytes, decoded with :func:`decode_image`, or PIL images)
    → RGB frames. All frames must have one size (``bad_size`` otherwise); an empty list is
    ``empty``."""
    if len(items) == 0:
        raise MediaError("empty", "a video needs at least one frame", key=key)
    frames = []
    for i, it in enumerate(items):
        if isinstance(it, Image.Image):
            frames.append(to_rgb(it))
        else:
            try:
                frames.append(decode_image(it, max_pixels=max_pixels, key=key))
            except MediaError as e:
                raise MediaError(e.reason, f"frame {i}: {e.message}", key=key) from e
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise MediaError("bad_size", f"frames differ in size: {sorted(sizes)}", key=key)
    return frames


def encode_video(frames: Sequence[Image.Image], fps: float = DEFAULT_FPS, format: str = "mp4") -> bytes:
    """Encode RGB frames losslessly and deterministically (same frames → same bytes).

    ``"mp4"``: H.264 in MP4 via PyAV, ``libx264rgb`` (RGB, ``qp=0``: bit-exact pixels), falling
    back to ``libx264`` yuv444p ``qp=0`` (±1 level) where the RGB encoder is missing; one thread.
    ``"apng"``: animated PNG via Pillow (no PyAV needed; note Pillow merges identical consecutive
    frames into one longer frame, so only use it when consecutive frames differ).
    """
    if not frames:
        raise ValueError("encode_video needs at least one frame")
    frames = [to_rgb(f) for f in frames]
    if len({f.size for f in frames}) > 1:
        raise ValueError("all frames must have the same size")
    if format == "apng":
        buf = io.BytesIO()
        frames[0].save(
            buf,
            format="PNG",
            save_all=True,
            append_images=frames[1:],
            duration=1000.0 / fps,
            loop=0,
            compress_level=6,
            default_image=False,
        )
        return buf.getvalue()
    if format != "mp4":
        raise ValueError(f"format must be 'mp4' or 'apng', got {format!r}")
    av = _import_av()
    import numpy as np

    rgb = "libx264rgb" in av.codecs_available
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264rgb" if rgb else "libx264", rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height = frames[0].size
        s.pix_fmt = "rgb24" if rgb else "yuv444p"
        s.codec_context.options = {"qp": "0", "preset": "medium"}
        s.codec_context.thread_count = 1
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


# -------------------------------------------------------------------------------------- layout


def patchify_video(x: torch.Tensor, patch_size: int, temporal_patch: int) -> torch.Tensor:
    """``x [n, C, H, W]`` (n a multiple of T) → ``[t*h*w, C*T*P*P]`` (layout: module docstring)."""
    if x.dim() != 4:
        raise ValueError(f"patchify_video expects [n, C, H, W], got shape {tuple(x.shape)}")
    n, c, hh, ww = x.shape
    p, T = int(patch_size), int(temporal_patch)
    if n % T or hh % p or ww % p:
        raise ValueError(f"{n} frames of {hh}x{ww} do not divide into temporal_patch {T} x patch_size {p}")
    t, h, w = n // T, hh // p, ww // p
    x = x.reshape(t, T, c, h, p, w, p).permute(0, 3, 5, 2, 1, 4, 6)  # [t, h, w, C, T, P, P]
    return x.reshape(t * h * w, c * T * p * p)


def unpatchify_video(
    patches: torch.Tensor, grid: Sequence[int], patch_size: int, temporal_patch: int, channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify_video`: ``[t*h*w, C*T*P*P]`` + grid → ``[t*T, C, h*P, w*P]``."""
    t, h, w = (int(v) for v in grid)
    p, T, c = int(patch_size), int(temporal_patch), int(channels)
    if tuple(patches.shape) != (t * h * w, c * T * p * p):
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {tuple(grid)}, P={p}, T={T}, C={c}")
    x = patches.reshape(t, h, w, c, T, p, p).permute(0, 4, 3, 1, 5, 2, 6)  # [t, T, C, h, P, w, P]
    return x.reshape(t * T, c, h * p, w * p)


def repeat_temporal(patches: torch.Tensor, temporal_patch: int, channels: int = 3) -> torch.Tensor:
    """Image patches ``[n, C*P*P]`` → ``[n, C*T*P*P]``: the image as ``T`` identical frames, so an
    encoder with a ``C*T*P*P`` patch embedding can take images too (Qwen2-VL does this)."""
    n, d = patches.shape
    T, c = int(temporal_patch), int(channels)
    if d % c:
        raise ValueError(f"patch dim {d} is not divisible by {c} channels")
    return patches.reshape(n, c, 1, d // c).expand(n, c, T, d // c).reshape(n, c * T * (d // c))


# ----------------------------------------------------------------------------------- processor


@dataclass(frozen=True)
class VideoPlan:
    """What a video of a given size becomes: source frame ``indices`` (length t*T), per-frame
    ``size (H, W)`` in pixels, ``grid (t, h, w)`` in patches, LLM ``tokens`` and whether frames had
    to be dropped or the resolution lowered to fit the budget."""

    indices: tuple[int, ...]
    size: tuple[int, int]
    grid: tuple[int, int, int]
    tokens: int
    lowered_resolution: bool
    dropped_frames: bool


@dataclass
class ProcessedVideo:
    """``patches [t*h*w, C*T*P*P]`` float32, ``grid (t, h, w)``, per-frame ``size (H, W)``,
    source ``frame_indices`` (length t*T) and source ``fps``."""

    patches: torch.Tensor
    grid: tuple[int, int, int]
    size: tuple[int, int]
    frame_indices: tuple[int, ...]
    fps: float

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class VideoProcessor:
    """Sample, budget, resize, normalise and patchify one video (contract: module docstring).

    Geometry and normalisation arguments are those of :class:`ImageProcessor` (``resolution``,
    ``min_pixels``/``max_pixels`` per frame, ...); :meth:`from_image_processor` copies them so
    images and videos share one preprocessing. Video arguments:

    Args:
        temporal_patch: frames per temporal patch ``T``.
        target_fps: sampling rate (None: every frame, up to ``max_frames``).
        max_frames: most frames kept (rounded down to a multiple of ``T``; at least ``T``).
        max_video_tokens: LLM-token budget per video (None: no budget beyond the caps above).
        max_frames_decoded, max_decode_pixels: decoder guards (:func:`decode_video`).
        default_fps: frame rate of a frame list given without one.
    """

    _VIDEO_KEYS = (
        "temporal_patch",
        "target_fps",
        "max_frames",
        "max_video_tokens",
        "max_frames_decoded",
        "max_decode_pixels",
        "default_fps",
    )

    def __init__(
        self,
        patch_size: int = 8,
        merge_size: int = 1,
        resolution: str = "dynamic",
        image_size: int = 64,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_aspect_ratio: float = 200.0,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        reducing_gap: float | None = None,
        jpeg_draft: bool = False,  # frames are decoded by the video path; kept so image configs fit
        temporal_patch: int = 2,
        target_fps: float | None = 2.0,
        max_frames: int = 16,
        max_video_tokens: int | None = 1024,
        max_frames_decoded: int = 4096,
        max_decode_pixels: int = 50_000_000,
        default_fps: float = DEFAULT_FPS,
    ) -> None:
        self.image = ImageProcessor(
            patch_size=patch_size,
            merge_size=merge_size,
            resolution=resolution,
            image_size=image_size,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            max_aspect_ratio=max_aspect_ratio,
            interpolation=interpolation,
            mean=mean,
            std=std,
            reducing_gap=reducing_gap,
            jpeg_draft=jpeg_draft,
        )
        self.temporal_patch = _pos_int("temporal_patch", temporal_patch)
        self.max_frames = _pos_int("max_frames", max_frames)
        if self.max_frames < self.temporal_patch:
            raise ValueError(f"max_frames={max_frames} must be >= temporal_patch={temporal_patch}")
        if target_fps is not None:
            target_fps = float(target_fps)
            if not (math.isfinite(target_fps) and target_fps > 0):
                raise ValueError(f"target_fps must be positive or None, got {target_fps}")
        self.target_fps = target_fps
        self.max_video_tokens = None if max_video_tokens is None else _pos_int("max_video_tokens", max_video_tokens)
        self.max_frames_decoded = _pos_int("max_frames_decoded", max_frames_decoded)
        self.max_decode_pixels = _pos_int("max_decode_pixels", max_decode_pixels)
        self.default_fps = float(default_fps)
        if not (math.isfinite(self.default_fps) and self.default_fps > 0):
            raise ValueError(f"default_fps must be positive, got {default_fps}")
        if self.resolution in ("fixed", "crop") and self.max_video_tokens is not None:
            per = self._tokens_per_patch(self.image.image_size, self.image.image_size)
            if per > self.max_video_tokens:
                raise ValueError(
                    f"max_video_tokens={self.max_video_tokens} cannot hold one temporal patch at the fixed "
                    f"{self.image.image_size}px resolution ({per} tokens)"
                )
        f = self.image.factor
        self._scale = self.image._scale.view(1, 3, 1, 1, 1)
        self._shift = self.image._shift.view(1, 3, 1, 1, 1)
        self._f2 = f * f

    @classmethod
    def from_image_processor(cls, image_processor: ImageProcessor, **video_kw: Any) -> VideoProcessor:
        """Share ``image_processor``'s geometry and normalisation; ``video_kw`` sets the rest."""
        cfg = image_processor.to_config()
        cfg.update(video_kw)
        return cls(**cfg)

    # -- geometry ------------------------------------------------------------------------------
    @property
    def resolution(self) -> str:
        return self.image.resolution

    @property
    def patch_size(self) -> int:
        return self.image.patch_size

    @property
    def merge_size(self) -> int:
        return self.image.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector, ``3 * T * P * P``."""
        return 3 * self.temporal_patch * self.patch_size * self.patch_size

    def _tokens_per_patch(self, hh: int, ww: int) -> int:
        p = self.patch_size
        return visual_token_count((1, hh // p, ww // p), self.merge_size)

    def _sample(self, n_frames: int, fps: float | None, max_frames: int) -> list[int]:
        return sample_frames(n_frames, fps, self.target_fps, max_frames, self.temporal_patch)

    def _resize(self, height: int, width: int, cap_tokens: int | None) -> tuple[int, int]:
        """Per-frame size by the image rule, with the pixel cap lowered to ``cap_tokens`` tokens."""
        ip = self.image
        if ip.resolution in ("fixed", "crop"):  # video frames are squashed to the square (no crop)
            return ip.target_size(height, width)
        max_px, min_px = ip.max_pixels, ip.min_pixels
        if cap_tokens is None:
            return smart_resize(height, width, ip.factor, min_px, max_px, ip.max_aspect_ratio)
        max_px = min(max_px, cap_tokens * self._f2)
        size = smart_resize(height, width, ip.factor, min(min_px, max_px), max_px, ip.max_aspect_ratio)
        # smart_resize floors both sides when it scales down, so a cap just at the minimum size can
        # land below it: never go under the minimum resolution while the minimum itself fits.
        floor = self._min_size(height, width)
        if size[0] * size[1] < floor[0] * floor[1] <= max_px:
            size = floor
        return size

    def _min_size(self, height: int, width: int) -> tuple[int, int]:
        """The minimum per-frame resolution: the image rule with ``max_pixels = min_pixels``."""
        ip = self.image
        return smart_resize(height, width, ip.factor, ip.min_pixels, max(ip.min_pixels, self._f2), ip.max_aspect_ratio)

    def plan(self, n_frames: int, fps: float | None, height: int, width: int) -> VideoPlan:
        """Frames, per-frame size and grid for a video of ``n_frames`` frames of ``height x width``
        at ``fps``, within ``max_video_tokens`` (budget rule: module docstring). Pure geometry."""
        T, p, budget = self.temporal_patch, self.patch_size, self.max_video_tokens
        idx = self._sample(n_frames, fps, self.max_frames)
        size = self._resize(height, width, None)
        t = len(idx) // T
        tokens = t * self._tokens_per_patch(*size)
        lowered = dropped = False
        if budget is not None and tokens > budget:
            if self.resolution == "dynamic":
                lowered = True
                per_min = self._tokens_per_patch(*self._min_size(height, width))
                if t * per_min > budget:  # even the minimum resolution is over: drop frames
                    idx = self._sample(n_frames, fps, max(1, budget // per_min) * T)
                    dropped, t = True, len(idx) // T
                size = self._resize(height, width, budget // t)  # as large as the budget allows
            else:  # fixed resolution: only frames can go
                idx = self._sample(n_frames, fps, max(1, budget // self._tokens_per_patch(*size)) * T)
                dropped, t = True, len(idx) // T
            tokens = t * self._tokens_per_patch(*size)
        grid = (t, size[0] // p, size[1] // p)
        assert tokens == visual_token_count(grid, self.merge_size)
        assert budget is None or tokens <= budget, (tokens, budget)
        return VideoPlan(tuple(idx), size, grid, tokens, lowered, dropped)

    # -- processing ----------------------------------------------------------------------------
    def __call__(
        self,
        video: bytes | bytearray | memoryview | Sequence[Image.Image | bytes],
        fps: float | None = None,
        *,
        key: str | None = None,
    ) -> ProcessedVideo:
        """Process encoded video bytes, or a list of frames (PIL images or image bytes) at ``fps``
        (default ``default_fps``)."""
        if isinstance(video, (bytes, bytearray, memoryview)):
            plans: list[VideoPlan] = []

            def choose(info: VideoInfo) -> list[int]:
                plans.append(self.plan(info.n_frames, info.fps, info.height, info.width))
                return list(plans[0].indices)

            frames, src_fps = decode_video(
                video,
                key=key,
                max_pixels=self.max_decode_pixels,
                max_frames_decoded=self.max_frames_decoded,
                indices=choose,
            )
            plan = plans[0]
        else:
            all_frames = frames_from_images(list(video), key=key, max_pixels=self.max_decode_pixels)
            src_fps = float(fps) if fps is not None else self.default_fps
            w0, h0 = all_frames[0].size
            plan = self.plan(len(all_frames), src_fps, h0, w0)
            frames = [all_frames[i] for i in plan.indices]
        return self.process_frames(frames, plan, src_fps)

    def process_frames(self, frames: Sequence[Image.Image], plan: VideoPlan, fps: float) -> ProcessedVideo:
        """Resize + normalise + patchify already selected frames (``len(frames) == t*T``)."""
        hh, ww = plan.size
        p, T = self.patch_size, self.temporal_patch
        if len(frames) % T or len(frames) != len(plan.indices):
            raise ValueError(f"{len(frames)} frames do not match the plan's {len(plan.indices)}")
        resample = INTERPOLATIONS[self.image.interpolation]
        resized_cache: dict[int, torch.Tensor] = {}
        u8 = torch.empty(len(frames), hh, ww, 3, dtype=torch.uint8)
        for k, (src, f) in enumerate(zip(plan.indices, frames)):
            if src in resized_cache:  # padding repeats a frame: resize it once
                u8[k] = resized_cache[src]
                continue
            if f.mode != "RGB" or "transparency" in f.info:
                f = to_rgb(f)
            if f.size != (ww, hh):
                f = f.resize((ww, hh), resample, reducing_gap=self.image.reducing_gap)
            u8[k] = torch.frombuffer(bytearray(f.tobytes()), dtype=torch.uint8).view(hh, ww, 3)
            resized_cache[src] = u8[k]
        t, h, w = len(frames) // T, hh // p, ww // p
        # [t*T, H, W, C] -> [t, T, h, P, w, P, C] -> [t, h, w, C, T, P, P]; one byte copy, one float pass
        blocks = u8.view(t, T, h, p, w, p, 3).permute(0, 2, 4, 6, 1, 3, 5).reshape(t * h * w, 3, T, p, p)
        patches = blocks.to(torch.float32).mul_(self._scale).add_(self._shift)
        return ProcessedVideo(
            patches=patches.reshape(t * h * w, 3 * T * p * p),
            grid=(t, h, w),
            size=(hh, ww),
            frame_indices=plan.indices,
            fps=float(fps),
        )

    def to_pil(self, patches: torch.Tensor, grid: Sequence[int]) -> list[Image.Image]:
        """Undo patchify and normalisation: the resized frames (``t*T`` of them)."""
        x = unpatchify_video(patches.float(), grid, self.patch_size, self.temporal_patch)
        mean = torch.tensor(self.image.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image.std).view(1, 3, 1, 1)
        u8 = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return [Image.fromarray(a, "RGB") for a in u8]

    # -- config --------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-able dict that rebuilds this processor (the image keys plus the video keys)."""
        cfg = self.image.to_config()
        cfg.update({k: getattr(self, k) for k in self._VIDEO_KEYS})
        return cfg

    @classmethod
    def from_config(cls, d: Any) -> VideoProcessor:
        d = dict(d)
        d.pop("_target_", None)
        unknown = set(d) - set(cls().to_config())
        if unknown:
            raise ValueError(f"unknown VideoProcessor config keys: {sorted(unknown)}")
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_config().items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VideoProcessor) and self.to_config() == other.to_config()

    __hash__ = None


def _pos_int(name: str, v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)
