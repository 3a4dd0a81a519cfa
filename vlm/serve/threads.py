"""One OpenMP team per serving process: the engine thread's.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the PyPI wheels). Every thread that runs a
multi-threaded op gets a team of worker threads of its own, and libgomp counts them all: once the
process holds more OpenMP threads than the machine has CPUs, every team's workers stop spinning
between parallel regions and sleep at once, so each of a decode step's ~60 parallel regions pays a
wake-up. On a 2-core CPU a chain of 48 GEMMs took 6-7 ms with one team and 12 ms once three other
threads had each run one parallel op. In a server the main thread (loading the model) and the
image-preprocessing threads would add those teams; so the engine thread runs its ops with the
configured thread count and every other thread of the engine runs single-threaded
(`single_threaded_here`), which keeps the engine's team the only one.

Two thread counts decide whether a thread's op starts a team: libgomp's own (per thread, read by
ATen's parallel loops and oneDNN) and MKL's (process-wide unless set per thread; MKL's fp32 GEMMs
read it). A plain fp32 `F.linear` on a thread whose libgomp count is 1 still starts a team of
MKL's size, so both are set per thread here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def _libgomp():
    """The libgomp this process loaded with torch (None: another OpenMP runtime, or none)."""
    torch.get_num_threads()  # makes sure torch's OpenMP runtime is loaded and initialised
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libgomp" in line and "/" in line})
        return ctypes.CDLL(paths[0]) if paths else None
    except (OSError, IndexError):
        return None


@functools.cache
def _mkl_local():
    """MKL's per-thread thread count setter (`MKL_Set_Num_Threads_Local`, in the library torch
    links MKL into), or None where torch has no MKL."""
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libtorch_cpu" in line and "/" in line})
    for path in paths:
        try:
            fn = ctypes.CDLL(path).MKL_Set_Num_Threads_Local  # the C entry (by value)
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def _set_mkl_here(n: int) -> int:
    """This thread's MKL thread count (0: back to the process-wide one); the previous one, or 0."""
    try:
        fn = _mkl_local()
    except OSError:
        return 0
    return fn(n) if fn is not None else 0


def single_threaded_here() -> bool:
    """Run this thread's torch ops on this thread alone (no OpenMP team of its own), leaving every
    other thread's setting and torch's process-wide thread count as they are. False where the
    OpenMP runtime is not libgomp (then nothing changes)."""
    return _single_threaded() is not None and torch.get_num_threads() == 1


def _single_threaded() -> int | None:
    """`single_threaded_here`; this thread's MKL count before it (0: the process-wide one), or
    None where the runtime is not libgomp."""
    torch.get_num_threads()  # torch sets this thread's OpenMP thread count on first use: do it first
    lib = _libgomp()
    if lib is None:
        return None
    lib.omp_set_num_threads(1)
    return _set_mkl_here(1)


@contextlib.contextmanager
def single_threaded():
    """`single_threaded_here` for the block; this thread's own thread counts come back after it."""
    n = torch.get_num_threads()
    mkl_before = _single_threaded()
    try:
        yield
    finally:
        if mkl_before is not None:
            _libgomp().omp_set_num_threads(n)
            _set_mkl_here(mkl_before)
