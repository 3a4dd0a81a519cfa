"""The errors a user can cause, and how an entry point reports them.

This module is the bottom of the package: it imports nothing of `vlm`, so every layer can raise
these types. `user_errors()` turns any of them (and a missing file) into one clear line on stderr
and exit code 2, instead of a traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager


class SpecError(ValueError):
    """A model config key that is unknown, of the wrong type, out of range or inconsistent."""


class PretrainedError(ValueError):
    """A pretrained folder that does not fit: missing files, unsupported options, key mismatches."""


class CheckpointError(ValueError):
    """A checkpoint path that is missing, not a checkpoint, or does not fit its config."""


class MediaError(ValueError):
    """A media item that cannot be used. ``reason`` is a short code (`vlm.data.media` lists them)."""

    def __init__(self, reason: str, message: str = "", *, key: str | None = None) -> None:
        self.reason = str(reason)
        self.message = " ".join(str(message).split())  # one line, whatever the decoder said
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f" {self.key!r}" if self.key else ""
        text = f": {self.message}" if self.message else ""
        return f"media{where} refused [{self.reason}]{text}"

    def __reduce__(self):  # picklable across worker processes despite keyword-only `key`
        return (_rebuild_media_error, (self.reason, self.message, self.key))


def _rebuild_media_error(reason: str, message: str, key: str | None) -> MediaError:
    return MediaError(reason, message, key=key)


class SampleError(ValueError):
    """A sample that cannot be used. `reason` is a short code for counting."""

    def __init__(self, reason: str, key: str, message: str):
        super().__init__(f"sample {key!r}: {reason}: {message}")
        self.reason, self.key, self.message = reason, key, message


class DataError(RuntimeError):
    """The training data cannot go on: every shard is unreadable, or too many samples fail."""


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (numerics.on_nonfinite=halt)."""


class PipelineError(ValueError):
    """A recipe that cannot run as written (one line naming the stage or key)."""


class ServeConfigError(ValueError):
    """An engine option that cannot work (an unknown name, a bad value)."""


# NonFiniteError: the numerics guard halted training (numerics.on_nonfinite=halt); its message
# says which value went non-finite at which step. DataError: the shards cannot feed training.
# SpecError: a model config key that is unknown, of the wrong type or inconsistent.
USER_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    CheckpointError,
    MediaError,
    SampleError,
    NonFiniteError,
    DataError,
    PipelineError,
    ServeConfigError,
    SpecError,
    PretrainedError,
)


def one_line(e: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back wrapped in the
    worker's traceback ("Caught X in DataLoader worker process 0. Original Traceback …"); its
    last line is the message."""
    text = str(e).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.rsplit(".", 1)[-1] == type(e).__name__ else last
    return text


@contextmanager
def user_errors():
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
