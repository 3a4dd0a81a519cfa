"""Turn the errors a user can cause (a wrong path, an unreadable image, a bad checkpoint) into
one clear line on stderr and exit code 2, instead of a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from vlm.checkpoint import CheckpointError
from vlm.data.media import MediaError
from vlm.data.sample import SampleError
from vlm.data.webdataset import DataError
from vlm.gradient_step import NonFiniteError
from vlm.model.fields import SpecError
from vlm.model.hf.folder import PretrainedError
from vlm.pipeline import PipelineError
from vlm.serve.engines import ServeConfigError

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
