"""Safe image decoding: one hardened decoder for training, data conversion and inference.

Every image that enters the project goes through :func:`decode_image` (bytes) or
:func:`load_image` (a path). Both return a fully loaded ``RGB`` :class:`PIL.Image.Image` or raise
:class:`MediaError`, whose ``reason`` is a short code a data pipeline can count:

========================  ===========================================================================
reason                    meaning
========================  ===========================================================================
``empty``                 zero bytes
``unidentified``          not an image in any of the accepted formats (the file name is never trusted)
``too_many_pixels``       header size over ``max_pixels`` (refused before any pixel is decoded), or
                          Pillow's own decompression-bomb error
``corrupt``               truncated or broken data, or any unexpected decoder failure
``bad_size``              zero width or height
``unsupported``           a pixel mode that cannot be turned into RGB (e.g. ``LAB`` TIFF)
``missing``               :func:`load_image`: no such file
``unreadable``            :func:`load_image`: the path exists but cannot be read (directory, permissions)
``not_a_file``            :func:`read_file`: a device, named pipe or socket (never read: it may not end)
``too_large``             :func:`read_file`: the file is over its byte cap (checked before reading)
``aspect_ratio``          raised by :mod:`vlm.data.processor` for dynamic resolution, not here
========================  ===========================================================================

Conversion to RGB (:func:`to_rgb`, also used by the image processor):

* EXIF orientation is applied (a broken EXIF block is ignored, not fatal: photos with damaged EXIF
  are common and their pixels are fine).
* Anything with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, or ``P``/``L``/``RGB`` with a
  ``transparency`` entry) is composited on white.
* ``P``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ``HSV`` go through Pillow's ``convert("RGB")``.
* 16-bit (``I;16``, ``I;16B``, ...) is scaled by its type range (``/257``); 32-bit ``I`` is scaled
  as 16-bit when its values lie in ``[0, 65535]`` and min-max scaled otherwise; ``F`` is ``x255``
  when its values lie in ``[0, 1]`` and min-max scaled otherwise (NaN becomes the minimum). Values
  are scaled, never clipped.
* Animated GIF / WebP / APNG: the first frame.

Only the formats in :data:`ALLOWED_FORMATS` are tried. Pillow can open many more (EPS would run
Ghostscript, for example); a training pipeline that reads files from the internet should not.

Thread note: while decoding, ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is forced to ``False`` (and
restored afterwards) so that a library that set it globally cannot make us accept truncated files,
and Pillow's ``DecompressionBombWarning`` is silenced (our own ``max_pixels`` check is the
authority). Both are process-global settings; they are changed under a lock and restored, which is
safe for data-loader worker processes and harmless for threads.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlm.errors import MediaError
from vlm.files import FileRefused, read_regular_file

# Register the plugins we accept up front: with an explicit `formats=` list Pillow does not import
# plugins lazily (WebP and TIFF would otherwise be missing until something else loaded them).
for _plugin in (
    "JpegImagePlugin",
    "MpoImagePlugin",
    "PngImagePlugin",
    "WebPImagePlugin",
    "GifImagePlugin",
    "BmpImagePlugin",
    "TiffImagePlugin",
):
    try:
        __import__(f"PIL.{_plugin}")
    except ImportError:  # pragma: no cover - a Pillow built without e.g. libwebp
        pass

__all__ = [
    "ALLOWED_FORMATS",
    "MediaError",
    "decode_image",
    "load_image",
    "read_file",
    "to_rgb",
]

#: Pillow format names :func:`decode_image` will try. ``MPO`` is how Pillow names the multi-picture
#: JPEGs many phones write (recent Pillow opens them through the JPEG entry; older ones register
#: ``MPO`` separately); they decode as their first (primary) picture. Names Pillow does not know
#: are skipped.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Magic numbers of the accepted formats, used only to tell "corrupt PNG" from "not an image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)

_HIGH_DEPTH_16 = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------- guards

_guard_lock = threading.Lock()
_guard_depth = 0
_guard_saved_truncated = False


@contextmanager
def strict_pillow() -> Iterator[None]:
    """Refuse truncated files and silence Pillow's bomb warning for the duration of one decode."""
    global _guard_depth, _guard_saved_truncated
    with _guard_lock:
        if _guard_depth == 0:
            _guard_saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _guard_depth += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _guard_saved_truncated


def _sniff(data: bytes) -> str | None:
    head = bytes(data[:16])
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _header_size(data, fmt: str | None) -> tuple[int, int] | None:
    """Width and height straight from the header bytes, used only to explain why Pillow refused a
    file (Pillow rejects e.g. a 0-wide PNG as "cannot identify"). ``None`` when unknown."""
    b = bytes(data[:65536])
    try:
        if fmt == "PNG" and b[12:16] == b"IHDR":
            return struct.unpack(">II", b[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", b[6:10])
        if fmt == "BMP":
            if struct.unpack("<I", b[14:18])[0] == 12:  # OS/2 core header
                return struct.unpack("<HH", b[18:22])
            w, h = struct.unpack("<ii", b[18:26])
            return w, abs(h)
        if fmt == "JPEG":
            i = 2
            while i + 9 < len(b):
                if b[i] != 0xFF:
                    return None
                marker = b[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                seg = struct.unpack(">H", b[i + 2 : i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
                    h, w = struct.unpack(">HH", b[i + 5 : i + 9])
                    return w, h
                i += 2 + seg
    except struct.error:
        return None
    return None


# ----------------------------------------------------------------------------------- decoding


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int = 50_000_000,
    key: str | None = None,
    formats: tuple[str, ...] | list[str] | None = ALLOWED_FORMATS,
    draft=None,
) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image, or raise :class:`MediaError`.

    ``max_pixels`` bounds ``width * height`` as read from the header, before any pixel is
    decoded (Pillow itself still refuses anything above ``2 * Image.MAX_IMAGE_PIXELS``).
    ``key`` names the item in error messages (a shard key or a path). ``formats`` restricts the
    Pillow plugins tried (``None``: all of Pillow's, not recommended for untrusted data).
    ``draft(width, height) -> (w, h) | None``: for JPEGs, the size the caller will resize to (as
    displayed, after EXIF rotation); libjpeg then decodes at the largest 1/2, 1/4 or 1/8 scale
    that is still at least that big (`ImageProcessor.draft_size`).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise MediaError("empty", "zero bytes", key=key)
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    try:
        with strict_pillow():
            return _decode(data, max_pixels=max_pixels, key=key, formats=formats, draft=draft)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError("too_many_pixels", str(e), key=key) from e
    except Exception as e:  # anything else a decoder throws: the data is bad
        raise MediaError("corrupt", f"{type(e).__name__}: {e}", key=key) from e


def _decode(data, *, max_pixels: int, key: str | None, formats, draft=None) -> Image.Image:
    fmt_hint = _sniff(data)
    if formats is not None:
        formats = [f.upper() for f in formats if f.upper() in Image.OPEN]
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError as e:
        size = _header_size(data, fmt_hint)
        if size is not None and (size[0] <= 0 or size[1] <= 0):
            raise MediaError("bad_size", f"{fmt_hint} header says {size[0]}x{size[1]}", key=key) from e
        if fmt_hint is not None and (formats is None or fmt_hint in formats):
            raise MediaError("corrupt", f"starts like {fmt_hint} but its header cannot be read", key=key) from e
        what = f"a {fmt_hint} file, which is not an accepted format" if fmt_hint else "not an image"
        raise MediaError("unidentified", f"{what} (accepted: {', '.join(formats or ['any'])})", key=key) from e

    width, height = img.size
    if width <= 0 or height <= 0:
        raise MediaError("bad_size", f"{img.format} header says {width}x{height}", key=key)
    if width * height > max_pixels:
        raise MediaError(
            "too_many_pixels",
            f"{img.format} header says {width}x{height} = {width * height} pixels > max_pixels={max_pixels}",
            key=key,
        )

    if draft is not None and img.format == "JPEG":
        try:
            rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF turns it by 90 degrees
        except Exception:
            rotated = False
        want = draft(height, width) if rotated else draft(width, height)
        if want is not None:
            tw, th = want
            img.draft(img.mode, (th, tw) if rotated else (tw, th))
    animated = bool(getattr(img, "is_animated", False))
    if animated:
        img.seek(0)
    img.load()  # raises OSError("image file is truncated") on short data

    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # damaged EXIF: keep the pixels, skip the rotation
        pass

    out = to_rgb(img)
    if out is img:
        if animated:  # do not hand out an object that still holds the other frames' stream
            out = img.copy()
        else:
            out.load()
    if out.width <= 0 or out.height <= 0:  # pragma: no cover - defensive
        raise MediaError("bad_size", f"decoded to {out.width}x{out.height}", key=key)
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to ``RGB`` by the rules in the module docstring.

    Returns ``img`` itself when it is already plain RGB, otherwise a new image. Raises
    :class:`MediaError` (``unsupported``) for modes Pillow cannot convert.
    """
    mode = img.mode
    has_transparency = "transparency" in img.info
    if mode == "RGB" and not has_transparency:
        return img
    if mode in _HIGH_DEPTH_16 or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    try:
        if mode in _ALPHA_MODES or (has_transparency and mode in ("P", "L", "RGB", "1")):
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, _WHITE)
            out.paste(rgba, (0, 0), rgba)  # alpha-blend over white
            return out
        return img.convert("RGB")
    except ValueError as e:  # "conversion from X to RGB not supported"
        raise MediaError("unsupported", f"cannot convert mode {mode} to RGB ({e})") from e


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float single-channel images → 8-bit grey → RGB (scaled)."""
    mode = img.mode
    a = np.asarray(img)
    if mode in _HIGH_DEPTH_16:
        u8 = _rint_u8(a.astype(np.float32) / 257.0)
    elif mode == "I":
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 65535:
            u8 = _rint_u8(a.astype(np.float32) / 257.0)
        else:
            u8 = _minmax_u8(a.astype(np.float64), lo, hi)
    else:  # "F"
        a = a.astype(np.float32, copy=True)
        finite = np.isfinite(a)
        if not finite.all():
            if finite.any():
                lo_f, hi_f = float(a[finite].min()), float(a[finite].max())
            else:
                lo_f = hi_f = 0.0
            a = np.nan_to_num(a, nan=lo_f, posinf=hi_f, neginf=lo_f)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            u8 = _rint_u8(a * 255.0)
        else:
            u8 = _minmax_u8(a, lo, hi)
    return Image.fromarray(u8).convert("RGB")  # fromarray of 2-D uint8 gives mode "L"


def _rint_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)  # clip only guards float round-off


def _minmax_u8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # constant image: no range to stretch
        return np.zeros(x.shape, dtype=np.uint8)
    return _rint_u8((x - lo) * (255.0 / (hi - lo)))


MAX_FILE_BYTES = 512 * 2**20  # the most a media file named on the command line may hold


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, *, key: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (:func:`vlm.files.read_regular_file`).

    A device, named pipe or socket is refused at once (``not_a_file``: a pipe would block the
    reader, ``/dev/zero`` never ends); a file over the cap is refused from its size
    (``too_large``); ``missing`` / ``unreadable`` as in :func:`load_image`.
    """
    try:
        return read_regular_file(path, max_bytes)
    except FileRefused as e:
        raise MediaError(e.reason, e.message, key=key or os.fspath(path)) from None


def load_image(path: str | os.PathLike, **kw) -> Image.Image:
    """Read ``path`` (:func:`read_file`: a regular file within its size cap) and
    :func:`decode_image` it; keyword arguments pass through.

    A missing file raises ``MediaError(reason="missing")``; a directory or a permission problem
    ``unreadable``; a device, pipe or socket ``not_a_file``. The path is the default ``key`` in
    messages.
    """
    kw.setdefault("key", os.fspath(path))
    return decode_image(read_file(path, key=kw["key"]), **kw)
