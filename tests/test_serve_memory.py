"""`vlm.serve.memory`: a serving process keeps freed activation memory instead of faulting it in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# forwards of a small MLP stack over prompts of changing lengths (activations of 1-10 MiB each,
# allocated and freed per layer, as a served model's are); page faults in the third round
PROBE = """
import resource, sys, torch
from vlm.serve.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "1" else False
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512), torch.nn.LayerNorm(512))
layers = torch.nn.Sequential(*[mlp] * 4)
with torch.no_grad():
    for rnd in range(3):  # prompts of different lengths, as requests come; the last round counts
        if rnd == 2:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for n in (1200, 700, 1100, 900, 1000, 800, 1150, 600, 950):
            layers(torch.randn(n, 512))
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> tuple[str, int]:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if keep else "0"], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert out.returncode == 0, out.stderr
    kept, faults = out.stdout.split()
    return kept, int(faults)


def test_freed_activations_are_reused_without_page_faults():
    """Once the heap has grown to the largest forward, later forwards take no new pages with the
    memory kept; with glibc's defaults, freed blocks went back to the kernel and come back as new
    pages, zero-filled by a fault each."""
    kept, faults = _faults(True)
    if kept != "True":
        return  # not glibc: nothing changes
    _, default_faults = _faults(False)
    assert default_faults > 5000  # the probe does exercise the problem
    assert faults < 500, f"{faults} page faults with the freed memory kept ({default_faults} without)"


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
