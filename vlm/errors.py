"""Turn the errors a user can cause (a wrong path, an unreadable image, a bad checkpoint) into
one clear line on stderr and exit code 2, instead of a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from vlm.checkpoint import CheckpointError
from vlm.data.media import MediaError
from vlm.data.sample import SampleError
from vlm.module import NonFiniteError

# NonFiniteError: the numerics guard halted training (numerics.on_nonfinite=halt); its message
# says which value went non-finite at which step.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, CheckpointError, MediaError, SampleError,
               NonFiniteError)


@contextmanager
def user_errors():
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
