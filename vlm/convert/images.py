"""Images referenced by records: paths confined to the image root (no URLs, no ``..``), every file
fully decoded before it is kept, and stored as its original bytes under the extension of the
format that decoded."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from vlm.convert.common import ConvertError, Skip
from vlm.data.media import MediaError, decode_image

# Pillow format -> the extension stored in the shard (the loader accepts all of these).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # a scheme of 2+ chars (not a Windows drive letter)


def media_ctx(image_root, max_pixels: int, max_image_bytes: int) -> dict:
    """The image part of a builder's ``ctx``: the resolved root (it must be a directory) and the limits."""
    root = Path(image_root)
    if not root.is_dir():
        raise ConvertError(f"image_root {root} is not a directory")
    return {"image_root": str(root.resolve()), "max_pixels": int(max_pixels), "max_image_bytes": int(max_image_bytes)}


def resolve_image_path(image_root: str | os.PathLike, rel: Any) -> Path:
    """``image_root / rel``, or :class:`Skip`.

    ``url_not_allowed``: anything with a URL scheme (``http:``, ``s3:``, ``file:``, ``data:``…).
    ``path_escape``: a ``..`` component anywhere (never resolved), or an absolute path that is not
    under ``image_root``. ``bad_path``: not a non-empty string, or a NUL byte. Symlinks *inside*
    the root are followed: the root is the user's, the records are what is untrusted."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        raise Skip("bad_path", f"image path must be a non-empty string, got {rel!r:.80}")
    if "://" in rel or _URL_RE.match(rel):
        raise Skip("url_not_allowed", f"{rel!r:.120}: URLs are not fetched; download the images and give paths")
    parts = re.split(r"[\\/]", rel)
    if ".." in parts:
        raise Skip("path_escape", f"{rel!r:.120} contains '..'")
    root = os.path.abspath(image_root)
    if os.path.isabs(rel):
        p = os.path.normpath(rel)
        if os.path.commonpath([root, p]) != root:
            raise Skip("path_escape", f"{rel!r:.120} is outside the image root")
        return Path(p)
    return Path(os.path.normpath(os.path.join(root, rel)))


def read_image(image_root: str, rel: Any, opts: dict, key: str) -> tuple[bytes, str]:
    """Validated original bytes and their true extension, or :class:`Skip`."""
    path = resolve_image_path(image_root, rel)
    try:
        size = os.stat(path).st_size
        if size > opts["max_image_bytes"]:
            raise Skip("media_too_large", f"{rel}: {size} bytes > max_image_bytes={opts['max_image_bytes']}")
        with open(path, "rb") as f:
            data = f.read(opts["max_image_bytes"] + 1)
    except FileNotFoundError:
        raise Skip("media_missing", f"no such file: {rel}") from None
    except OSError as e:
        raise Skip("media_unreadable", f"{rel}: {e.strerror or e}") from None
    return check_image_bytes(data, str(rel), opts, key)


def check_image_bytes(data: bytes, what: str, opts: dict, key: str) -> tuple[bytes, str]:
    """``data`` fully decoded within the limits of ``opts`` (``media_*`` :class:`Skip` otherwise),
    returned with the extension of the format that decoded; ``what`` names the image in messages."""
    if len(data) > opts["max_image_bytes"]:
        raise Skip("media_too_large", f"{what}: {len(data)} bytes > max_image_bytes={opts['max_image_bytes']}")
    try:
        decode_image(data, max_pixels=opts["max_pixels"], key=key)
    except MediaError as e:
        raise Skip(f"media_{e.reason}", f"{what}: {e.message}") from None
    with Image.open(io.BytesIO(data)) as im:  # header only: the format that decoded
        ext = _FORMAT_EXT.get(im.format or "", "")
    if not ext:  # pragma: no cover - decode_image only accepts the formats above
        raise Skip("media_unidentified", f"{what}: format {im.format}")
    return data, ext
