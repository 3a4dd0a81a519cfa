"""`vlm.serve.memory`: a serving process keeps freed activation memory instead of faulting it in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# blocks of a forward's activation size (12-24 MiB), each written and freed before the next, as
# one request's forward follows another's; the page faults of each
PROBE = """
import ctypes, resource, sys
from vlm.serve.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for mb in (24, 20, 24, 12, 24):  # a forward's activation, freed, then the next request's
    n = mb << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(kept, *faults)
"""


def _faults(keep: bool) -> tuple[str, list[int]]:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if keep else "0"], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert out.returncode == 0, out.stderr
    kept, *faults = out.stdout.split()
    return kept, [int(f) for f in faults]


def test_freed_blocks_are_reused_without_page_faults():
    """With the memory kept, the first block's pages serve every later one (no new page); with
    glibc's defaults the first is unmapped on free and the next ones come back as new pages,
    zero-filled by a fault each."""
    kept, faults = _faults(True)
    if kept != "True":
        return  # not glibc: nothing changes
    _, default_faults = _faults(False)
    assert sum(default_faults[1:]) > 4000  # the probe does exercise the problem
    assert sum(faults[1:]) < 100, f"page faults with the freed memory kept: {faults} ({default_faults} without)"


def test_keep_freed_memory_is_idempotent():
    from vlm.serve.memory import keep_freed_memory

    assert keep_freed_memory() == keep_freed_memory()


def test_loaded_objects_leave_the_collectors_full_passes():
    """What is alive when loading ends moves to the permanent generation (a full collection no
    longer walks it); objects made later are collected as usual."""
    import gc

    from vlm.serve.memory import freeze_loaded_objects

    loaded = [{"weight": i} for i in range(1000)]
    try:
        frozen = freeze_loaded_objects()
        assert frozen >= len(loaded) and gc.get_freeze_count() == frozen
        assert not any(o is loaded for o in gc.get_objects())  # out of every generation the collector walks
        later = [[]]
        later[0].append(later)  # a cycle made after the freeze
        assert gc.collect() >= 0 and any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()
