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


class _SumsByType(Metric):
    """Two sums per question type, `num` and `den` (named by the subclass); `_score(prediction,
    reference)` gives one sample's share of each, on normalised answers. Types not listed count
    as "other" when "other" is listed, else not at all."""

    full_state_update = False
    num: str
    den: str

    def __init__(self, qtypes: list[str], **kwargs):
        super().__init__(**kwargs)
        self.qtypes = list(qtypes)
        self.index = {q: i for i, q in enumerate(self.qtypes)}
        for name in (self.num, self.den):
            self.add_state(name, default=torch.zeros(len(qtypes)), dist_reduce_fx="sum")

    def _score(self, prediction: str, reference: str) -> tuple[float, float]:
        raise NotImplementedError

    def update(self, predictions: list[str], references: list[str], qtypes: list[str | None]) -> None:
        num, den = getattr(self, self.num), getattr(self, self.den)
        for p, r, q in zip(predictions, references, qtypes):
            i = self.index.get(q, self.index.get("other"))
            if i is not None:
                a, b = self._score(normalize_answer(p), normalize_answer(r))
                num[i] += a
                den[i] += b

    def _per_type(self) -> dict[str, torch.Tensor]:
        num, den = getattr(self, self.num), getattr(self, self.den)
        return {q: num[i] / den[i] for i, q in enumerate(self.qtypes) if den[i] > 0}


class ExactMatchByType(_SumsByType):
    """Share of answers exactly right per type, plus `mean` over types and `overall` over samples."""

    num, den = "correct", "total"

    def _score(self, prediction: str, reference: str) -> tuple[float, float]:
        return float(prediction == reference), 1.0

    def compute(self) -> dict[str, torch.Tensor]:
        out = self._per_type()
        if out:
            out["mean"] = torch.stack(list(out.values())).mean()
            out["overall"] = self.correct.sum() / self.total.sum()
        return out


class CharErrorRateByType(_SumsByType):
    """Corpus CER per type: sum of edit distances / sum of reference lengths. 0 is perfect; an
    empty prediction scores 1; a long wrong one can exceed 1. Types never seen are left out."""

    num, den = "edits", "chars"

    def _score(self, prediction: str, reference: str) -> tuple[float, float]:
        return float(edit_distance(prediction, reference)), float(len(reference))

    def compute(self) -> dict[str, torch.Tensor]:
        return self._per_type()
