"""Media named by local paths on the command line (`infer.py image=… video=…`, the terminal chat's
`/image PATH`): read once within their caps and checked to decode, so a bad file is one clear line."""

from __future__ import annotations

from pathlib import Path

from vlm.data.media import decode_image, read_file
from vlm.data.video import probe_video

_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_video(path: str) -> bytes | list[bytes]:
    """A video file's bytes (header checked), or a folder's frame images sorted by name."""
    p = Path(path)
    if p.is_dir():
        frames = sorted(f for f in p.iterdir() if f.suffix.lower() in _FRAME_SUFFIXES)
        if not frames:
            raise FileNotFoundError(f"video folder {p} holds no frame images ({', '.join(_FRAME_SUFFIXES)})")
        return [checked_image(f) for f in frames]
    data = read_file(p)  # a regular file within its cap: never a pipe or a device
    probe_video(data, key=str(p))  # fail early with one clear line (not a video, too large…)
    return data


def checked_image(path) -> bytes:
    """An image file's bytes, read once within its cap and checked to decode (one clear line if not)."""
    data = read_file(path)
    decode_image(data, key=str(path))
    return data


def path_list(v) -> list[str]:
    """`image=a.png`, `image=[a.png,b.png]` or null -> a list of paths."""
    if v is None:
        return []
    return [str(v)] if isinstance(v, (str, Path)) else [str(x) for x in v]
