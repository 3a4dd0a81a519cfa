"""Video bytes -> RGB frames: sniffing, probing and hardened decoding (the decoding half of
`vlm.data.video`).

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

from PIL import Image, ImageSequence

from vlm.data.media import MediaError, decode_image, read_file, strict_pillow, to_rgb

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
