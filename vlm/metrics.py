"""Exact-match accuracy per question type, as a torchmetrics Metric (sums reduce across ranks)."""

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
