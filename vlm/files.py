"""Reading a file a user named (an image on the command line, a checkpoint's config) without
trusting it.

A path can name something that is not a file: a named pipe blocks `open()` until someone writes
to it, `/dev/zero` and `/dev/urandom` never end, a directory cannot be read. So the file is opened
non-blocking and checked with `fstat` on the open descriptor (what is checked is what is read),
only regular files are read, and never more than a cap, checked against the size before reading
and again while reading (the file may grow). Callers turn `FileRefused` into their own error type.
"""

from __future__ import annotations

import os
import stat


class FileRefused(ValueError):
    """A path that was not read. `reason`: missing | unreadable | not_a_file | too_large."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words (for messages)."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open(path: str | os.PathLike) -> int:
    name = os.fspath(path)
    try:
        return os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileRefused("missing", f"no such file: {name}") from None
    except IsADirectoryError:
        raise FileRefused("unreadable", f"{name} is a directory, not a regular file") from None
    except OSError as e:
        raise FileRefused("unreadable", f"cannot read {name}: {e.strerror or e}") from None


def checked_stat(path: str | os.PathLike) -> os.stat_result:
    """`fstat` of the regular file at `path` (links followed); `FileRefused` for anything else."""
    fd = _open(path)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        reason = "unreadable" if stat.S_ISDIR(st.st_mode) else "not_a_file"
        raise FileRefused(reason, f"{os.fspath(path)} is {kind_of(st.st_mode)}, not a regular file")
    return st


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes` of them; `FileRefused` otherwise."""
    name = os.fspath(path)
    fd = _open(name)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            reason = "unreadable" if stat.S_ISDIR(st.st_mode) else "not_a_file"
            raise FileRefused(reason, f"{name} is {kind_of(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise FileRefused("too_large", f"{name} has {st.st_size} bytes, more than the {max_bytes} allowed")
        chunks, n = [], 0
        while n <= max_bytes:
            b = os.read(fd, min(1 << 20, max_bytes + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
        if n > max_bytes:
            raise FileRefused("too_large", f"{name} grew past {max_bytes} bytes while being read")
        return b"".join(chunks)
    except OSError as e:
        raise FileRefused("unreadable", f"cannot read {name}: {e.strerror or e}") from None
    finally:
        os.close(fd)
