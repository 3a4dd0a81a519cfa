"""Per-question-type answer metrics as torchmetrics Metrics (sums, so they reduce across ranks).

- `ExactMatchByType`: whole answer right or wrong (the headline number).
- `CharErrorRateByType`: character edits over reference characters. Exact match on a 12-20
  character string stays at 0 until the whole string is right; the CER shows how far reading got.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def normalize_answer(text: str) -> str:
    """Strip surrounding white space and a trailing period; case is kept (OCR is case-sensitive)."""
    return text.strip().rstrip(".").strip()


class ExactMatchByType(Metric):
    full_state_update = False

    def __init__(self, qtypes: list[str], **kwargs):
        super().__init__(**kwargs)
        self.qtypes = list(qtypes)
        self.index = {q: i for i, q in enumerate(self.qtypes)}
        self.add_state("correct", default=torch.zeros(len(qtypes)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(qtypes)), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str], qtypes: list[str | None]) -> None:
        for p, r, q in zip(predictions, references, qtypes):
            q = q if q in self.index else None
            if q is None:
                if "other" not in self.index:
                    continue
                q = "other"
            i = self.index[q]
            self.total[i] += 1
            self.correct[i] += float(normalize_answer(p) == normalize_answer(r))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {q: self.correct[i] / self.total[i] for i, q in enumerate(self.qtypes) if self.total[i] > 0}
        if out:
            out["mean"] = torch.stack(list(out.values())).mean()
            out["overall"] = self.correct.sum() / self.total.sum()
        return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1); O(len(a)·len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class CharErrorRateByType(Metric):
    """Corpus CER per question type: sum of edit distances / sum of reference lengths (after
    `normalize_answer`). 0 is perfect; an empty prediction scores 1; a long wrong one can exceed 1.
    Types never seen are left out of `compute()`; unknown types count as "other" when listed."""

    full_state_update = False

    def __init__(self, qtypes: list[str], **kwargs):
        super().__init__(**kwargs)
        self.qtypes = list(qtypes)
        self.index = {q: i for i, q in enumerate(self.qtypes)}
        self.add_state("edits", default=torch.zeros(len(qtypes)), dist_reduce_fx="sum")
        self.add_state("chars", default=torch.zeros(len(qtypes)), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str], qtypes: list[str | None]) -> None:
        for p, r, q in zip(predictions, references, qtypes):
            q = q if q in self.index else ("other" if "other" in self.index else None)
            if q is None:
                continue
            p, r = normalize_answer(p), normalize_answer(r)
            self.edits[self.index[q]] += edit_distance(p, r)
            self.chars[self.index[q]] += len(r)

    def compute(self) -> dict[str, torch.Tensor]:
        return {q: self.edits[i] / self.chars[i] for i, q in enumerate(self.qtypes) if self.chars[i] > 0}
