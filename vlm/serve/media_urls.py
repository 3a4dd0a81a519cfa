"""Where a request's image or video comes from: a `data:` URL or a file on the server's disk.

The server never fetches a remote URL: it would make every client able to send the server to any
address it can reach (and wait on it). A client that has an image at a URL downloads it and sends
it inline. Local paths are for clients on the same machine (the terminal chat, the batch runner, a
local script); `MediaPolicy.local_media=False` refuses them and `media_root` confines them to one
folder (symlinks resolved first, so a link cannot lead outside it). The HTTP server reads local
files only when it has a `media_root`.

Under a `media_root`, every refused path gets the same answer (`PATH_REFUSED`: one status, code
and message): outside the folder, missing, a directory, unreadable; so does any path when local
files are off. A client learns nothing about which paths exist beyond what it may read.

Images are checked here from their header alone (a real image, within the pixel cap) so that a
bad one is refused before it takes a place in the engine's queue; the engine decodes it fully.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlm.data.media import ALLOWED_FORMATS, MediaError, read_file, strict_pillow
from vlm.serve.api import RequestError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", re.DOTALL)
PATH_REFUSED = "media_path_refused"  # the one code of every refused local path
_HIDDEN_REASONS = ("missing", "unreadable", "not_a_file")  # read errors that would tell what exists


@dataclass
class MediaPolicy:
    """max_images / max_videos: per request, over all messages. max_image_pixels: width x height
    from the header. max_file_bytes: a local file's size cap. local_media: accept file paths at all.
    media_root: if set, the only folder local paths may point into (relative paths start there).
    base_dir: where other relative paths start (None: the working directory)."""

    max_images: int = 8
    max_videos: int = 1
    max_image_pixels: int = 16_777_216  # 4096 x 4096
    max_file_bytes: int = 64 * 2**20
    local_media: bool = True  # the HTTP server sets it only with a media_root (`server.options_from`)
    media_root: str | None = None
    base_dir: str | None = None


def _refuse(message: str, param: str, code: str = "invalid_image_url", status: int = 400) -> RequestError:
    return RequestError(message, status=status, param=param, code=code)


def _from_data_url(url: str, kind: str, where: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise _refuse(f"{where}: a data URL must look like data:{kind}/png;base64,<data>", where)
    mime, params, payload = m.group(1).strip().lower(), m.group(2).lower(), m.group(3)
    if not mime.startswith(f"{kind}/"):
        raise _refuse(f"{where}: the data URL holds {mime or 'text/plain'}, not an {kind} ({kind}/...)", where)
    if ";base64" not in params:
        raise _refuse(f"{where}: the data URL must be base64-encoded (data:{mime};base64,...)", where)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(f"{where}: the data URL's payload is not valid base64", where, "invalid_base64") from None
    if not data:
        raise _refuse(f"{where}: the data URL holds no bytes", where)
    return data


def _path_refused(where: str, kind: str) -> RequestError:
    return _refuse(
        f"{where}: this server does not read that path (local files are read only from its media folder, "
        f"when it has one); send the {kind} inline as a data URL (data:{kind}/...;base64,...)",
        where,
        PATH_REFUSED,
    )


def _local_path(url: str, where: str, kind: str, policy: MediaPolicy) -> Path:
    if not policy.local_media:
        raise _path_refused(where, kind)
    text = url[len("file://") :] if url.startswith("file://") else url
    if policy.media_root:
        root = Path(policy.media_root).expanduser().resolve()
        try:
            path = (root / text).resolve()  # an absolute path stays absolute; symlinks are followed
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            raise _path_refused(where, kind) from None
        if not path.is_relative_to(root):
            raise _path_refused(where, kind)
        return path
    path = Path(text).expanduser()
    if policy.base_dir and not path.is_absolute():
        path = Path(policy.base_dir) / path
    return path


def media_bytes(url, kind: str, where: str, policy: MediaPolicy) -> bytes:
    """The encoded bytes behind an `image_url` / `video_url` url (kind: "image" or "video")."""
    if not isinstance(url, str) or not url.strip():
        raise _refuse(f"{where}: the url must be a non-empty string", where)
    url = url.strip()
    scheme = _SCHEME.match(url)
    scheme = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None  # "C:" is a drive
    if scheme == "data":
        return _from_data_url(url, kind, where)
    if scheme in ("http", "https"):
        raise _refuse(
            f"{where}: this server does not fetch remote URLs; download the {kind} and send it inline as a "
            f"data URL (data:{kind}/...;base64,...)",
            where,
        )
    if scheme not in (None, "file"):
        raise _refuse(f"{where}: unsupported URL scheme {scheme!r} (use a data: URL or a local path)", where)
    path = _local_path(url, where, kind, policy)
    try:
        return read_file(path, policy.max_file_bytes)
    except MediaError as e:
        if policy.media_root and e.reason in _HIDDEN_REASONS:
            raise _path_refused(where, kind) from None
        raise _refuse(f"{where}: {e.message or e}", where, f"file_{e.reason}") from None
    except (OSError, ValueError):  # a name too long, a NUL byte
        raise _path_refused(where, kind) from None


def check_image(data: bytes, where: str, policy: MediaPolicy) -> None:
    """Refuse what is not an image in an accepted format, or is over the pixel cap, from the header."""
    try:
        with strict_pillow():
            formats = [f for f in ALLOWED_FORMATS if f in Image.OPEN]  # as decode_image: known plugins only
            size = Image.open(io.BytesIO(data), formats=formats).size
    except Image.DecompressionBombError:
        size = None
    except Exception:
        formats = ", ".join(f for f in ALLOWED_FORMATS if f != "MPO")
        raise _refuse(f"{where}: not an image in an accepted format ({formats})", where, "invalid_image") from None
    if size is None or size[0] * size[1] > policy.max_image_pixels:
        got = f"{size[0]}x{size[1]}" if size else "too many"
        raise _refuse(
            f"{where}: the image is {got} pixels, over this server's cap of {policy.max_image_pixels}",
            where,
            "image_too_large",
        )
    if size[0] <= 0 or size[1] <= 0:
        raise _refuse(f"{where}: the image has no pixels ({size[0]}x{size[1]})", where, "invalid_image")
