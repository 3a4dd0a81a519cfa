"""Batch processed samples: pad text, pack media.

Batch contract: `input_ids [B, L]`, `labels [B, L]` (-100 = no loss),
`attention_mask [B, L]` (1 = real token), `position_ids [B, L]` or `[3, B, L]`,
`pixel_patches [Σn, C·P·P]`, `grid_thw [M, 3]` and `media_per_sample [B]`, media in sample order.
Training pads on the right; generation pads on the left so every row ends at its prompt's end.
Packed rows (`vlm.data.packing`) add `seq_ids [B, L]` (k = the row's k-th sample, 0 = padding)
and `sample_lengths [S]` (every packed sample's length, row by row, for attention FLOPs without a
device sync); `media_per_sample` then counts the media of each row.
"""

from __future__ import annotations

from collections import Counter

import torch

from vlm.data.sample import ProcessedSample
from vlm.data.template import IGNORE


def collate(samples: list[ProcessedSample], pad_id: int, padding_side: str = "right") -> dict:
    skipped = Counter()
    for s in samples:
        skipped.update(s.skipped or {})
    samples = [s for s in samples if not s.report_only]
    if not samples:  # only the skip counts of a stream's trailing bad samples
        return {"empty": True, "keys": [], "skipped": skipped}
    B = len(samples)
    L = max(s.input_ids.numel() for s in samples)
    mrope = samples[0].position_ids.dim() == 2
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    position_ids = torch.zeros((3, B, L) if mrope else (B, L), dtype=torch.long)
    for b, s in enumerate(samples):
        n = s.input_ids.numel()
        sl = slice(L - n, L) if padding_side == "left" else slice(0, n)
        input_ids[b, sl] = s.input_ids
        labels[b, sl] = s.labels
        attention_mask[b, sl] = 1
        position_ids[..., b, sl] = s.position_ids
    patches = [p for s in samples for p in s.patches]
    grids = [g for s in samples for g in s.grids]
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pixel_patches": torch.cat(patches, 0) if patches else None,
        "grid_thw": torch.tensor(grids, dtype=torch.long).view(-1, 3) if grids else None,
        "media_per_sample": torch.tensor([len(s.grids) for s in samples], dtype=torch.long),
        "keys": [s.key for s in samples],
        "skipped": skipped,
    }
    if samples[0].seq_lens is not None:
        seq_ids = torch.zeros(B, L, dtype=torch.long)
        for b, s in enumerate(samples):
            start = L - s.input_ids.numel() if padding_side == "left" else 0
            for j, n in enumerate(s.seq_lens):
                seq_ids[b, start : start + n] = j + 1
                start += n
        batch["seq_ids"] = seq_ids
        batch["sample_lengths"] = torch.tensor([n for s in samples for n in s.seq_lens], dtype=torch.long)
    if samples[0].source is not None:  # data=mix: samples per source in this batch
        batch["sources"] = Counter(name for s in samples for name in (s.source or "").split("+") if name)
    if samples[0].prompt is not None:
        batch["answers"] = [s.answer for s in samples]
        batch["qtypes"] = [s.qtype for s in samples]
        batch["prompts"] = [s.prompt for s in samples]
    return batch


class Collator:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id, self.padding_side = pad_id, padding_side

    def __call__(self, samples):
        return collate(samples, self.pad_id, self.padding_side)
