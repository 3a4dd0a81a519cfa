"""Memory habits of a serving process: freed memory is kept for the next request, and the objects
loaded at start stay out of the garbage collector's way.

By default glibc serves every block above a threshold (128 KiB, rising to the largest block freed
so far) with a fresh `mmap` and gives heap memory above 128 KiB at the top back to the kernel on
`free`. A model forward allocates and frees activations of megabytes each layer, so every one
came back as new pages, each zero-filled by a page fault on first touch: a prefill forward of 8
prompts (1666 tokens) of a 40M-parameter model took ~80-125 thousand page faults and ran ~20%
slower than with the memory kept. `keep_freed_memory` raises both thresholds, so blocks up to
32 MiB come from the heap and freed memory stays with the process (its resident size stays at
its peak, as a server's does anyway).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: never trim below 2 GiB of free heap top


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed memory in the process (once per process). False where the C library is not
    glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("glibc refused the malloc thresholds; freed memory goes back to the kernel")
    return ok


def freeze_loaded_objects() -> int:
    """Move every object alive now (the model's modules, the tokenizer's vocabulary, the imported
    libraries: ~400 thousand for a 40M-parameter model) out of the garbage collector's reach; the
    number moved. A full collection walks every tracked object while holding the GIL: ~100 ms
    each in a server that had loaded such a model, a pause for the engine thread at every one.
    Call once loading is done; what is created later is collected as usual."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
