"""Per-question-type answer metrics as torchmetrics Metrics (sums, so they reduce across ranks).

- `ExactMatchByType`: whole answer right or wrong (the headline number).
- `CharErrorRateByType`: character edits (torchmetrics' edit distance) over reference characters. Exact match on a 12-20
  character string stays at 0 until the whole string is right; the CER shows how far reading got.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.functional.text import edit_distance as text_edit_distance


def normalize_answer(text: str) -> str:
    """Strip surrounding white space and a trailing period; case is kept (OCR is case-sensitive)."""
    return text.strip().rstrip(".").strip()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters (insertions, deletions, substitutions each cost 1)."""
    return int(_edit_distances([a], [b])[0])


def _edit_distances(predictions: list[str], references: list[str]) -> list[int]:
    if not predictions:
        return []
    return [int(x) for x in text_edit_distance(predictions, references, reduction="none")]


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

    def _scores(self, predictions: list[str], references: list[str]) -> list[tuple[float, float]]:
        """Each sample's share of `num` and `den`, from normalised answers."""
        raise NotImplementedError

    def update(self, predictions: list[str], references: list[str], qtypes: list[str | None]) -> None:
        num, den = getattr(self, self.num), getattr(self, self.den)
        rows = [
            (self.index.get(q, self.index.get("other")), normalize_answer(p), normalize_answer(r))
            for p, r, q in zip(predictions, references, qtypes)
        ]
        rows = [r for r in rows if r[0] is not None]
        for (i, _, _), (a, b) in zip(rows, self._scores([p for _, p, _ in rows], [r for _, _, r in rows])):
            num[i] += a
            den[i] += b

    def _per_type(self) -> dict[str, torch.Tensor]:
        num, den = getattr(self, self.num), getattr(self, self.den)
        return {q: num[i] / den[i] for i, q in enumerate(self.qtypes) if den[i] > 0}


class ExactMatchByType(_SumsByType):
    """Share of answers exactly right per type, plus `mean` over types and `overall` over samples."""

    num, den = "correct", "total"

    def _scores(self, predictions: list[str], references: list[str]) -> list[tuple[float, float]]:
        return [(float(p == r), 1.0) for p, r in zip(predictions, references)]

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

    def _scores(self, predictions: list[str], references: list[str]) -> list[tuple[float, float]]:
        return [(float(e), float(len(r))) for e, r in zip(_edit_distances(predictions, references), references)]

    def compute(self) -> dict[str, torch.Tensor]:
        return self._per_type()
