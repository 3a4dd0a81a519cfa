"""Sequence packing: several processed samples per row of at most `length` tokens.

`data.packing=true` packs the training stream in each DataLoader worker: every `window` consecutive
good samples are packed into rows with `best_fit` (longest first, each into the fullest row it
still fits — "best-fit decreasing", a few % waste at most) or `greedy` (in stream order, a new row
when the next sample does not fit — "next-fit"). A packed row keeps every sample's own position
ids (they restart per sample, 1D or M-RoPE) and records the samples' lengths (`seq_lens`); the
collator turns them into `seq_ids [B, L]` and the model into a block-diagonal causal mask, so no
token attends across samples. The vision side is unchanged: a row's media are packed per item.

Exact resume: rows are a pure function of their window, so a row's stream position is "the
window's first sample, plus how many of the window's rows were already emitted"; a resumed worker
re-reads (and re-decodes) at most one window and drops the rows the model already had.
"""

from __future__ import annotations

import bisect

import torch

from vlm.data.sample import ProcessedSample

METHODS = ("best_fit", "greedy")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins whose lengths sum to at most `capacity`: longest item first,
    each into the fullest bin that still has room (ties: the earlier bin). Bins keep their items
    in stream order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of {capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def greedy(lengths: list[int], capacity: int) -> list[list[int]]:
    """Next-fit in stream order."""
    bins: list[list[int]] = []
    used = capacity + 1
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of {capacity}")
        if used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def concat(samples: list[ProcessedSample]) -> ProcessedSample:
    """One packed row: texts, labels and positions concatenated; media in row order."""
    return ProcessedSample(
        key="+".join(s.key for s in samples),
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat([s.labels for s in samples]),
        position_ids=torch.cat([s.position_ids for s in samples], -1),
        patches=[p for s in samples for p in s.patches],
        grids=[g for s in samples for g in s.grids],
        kinds=[k for s in samples for k in (s.kinds or [])],
        seq_lens=[s.input_ids.numel() for s in samples],
        skipped=_merged_skips(samples),
        source="+".join(s.source for s in samples) if samples[0].source is not None else None,
    )


def _merged_skips(samples: list[ProcessedSample]) -> dict | None:
    out: dict = {}
    for s in samples:
        for k, v in (s.skipped or {}).items():
            out[k] = out.get(k, 0) + v
    return out or None


def pack(samples: list[ProcessedSample], length: int, method: str = "best_fit") -> list[ProcessedSample]:
    """Pack one window of samples into rows of at most `length` tokens (deterministic)."""
    if method not in METHODS:
        raise ValueError(f"data.pack_method must be one of {METHODS}, got {method!r}")
    lengths = [s.input_ids.numel() for s in samples]
    bins = (best_fit_decreasing if method == "best_fit" else greedy)(lengths, length)
    return [concat([samples[i] for i in b]) for b in bins]


def padding_fraction(row_lengths: list[list[int]], batch_size: int) -> float:
    """Share of pad tokens when rows (each a list of sample lengths) are batched `batch_size` at a
    time and right-padded to the longest row of their batch."""
    totals = [sum(r) for r in row_lengths]
    pad = cap = 0
    for i in range(0, len(totals), batch_size):
        chunk = totals[i : i + batch_size]
        cap += max(chunk) * len(chunk)
        pad += max(chunk) * len(chunk) - sum(chunk)
    return pad / max(cap, 1)
