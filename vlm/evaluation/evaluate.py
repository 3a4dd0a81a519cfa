"""Generate + score: the one evaluation loop, used by validation during training and by
`python infer.py data=…`.

An `Evaluator` takes evaluation batches (left-padded, with `answers` and `qtypes`), generates
greedy answers, and keeps per-question-type exact match and character error rate (torchmetrics
states, so they reduce across ranks), the per-reason skip counts of the loader, the number of
samples and the visual tokens the decoder saw (after pruning).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from vlm.evaluation.metrics import CharErrorRateByType, ExactMatchByType, normalize_answer
from vlm.model.generate import generate
from vlm.model.vlm import VLM, media_span_ids
from vlm.tokenizer import TextTokenizer


@dataclass
class Scored:
    """One evaluated batch: predictions beside what they were scored against."""

    keys: list[str]
    qtypes: list[str | None]
    prompts: list[str]
    answers: list[str]
    predictions: list[str]

    def rows(self) -> list[dict]:
        """JSON-ready rows, one per sample (what `infer.py` writes to the predictions file)."""
        return [
            {
                "key": k,
                "qtype": q,
                "question": pr,
                "answer": a,
                "prediction": p,
                "correct": normalize_answer(p) == normalize_answer(a),
            }
            for k, q, pr, a, p in zip(self.keys, self.qtypes, self.prompts, self.answers, self.predictions)
        ]


class Evaluator:
    """Score generated answers per question type (`qtypes`; anything else counts as "other")."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        qtypes: list[str] | None,
        eos_ids: list[int],
        max_new_tokens: int = 32,
        prune: dict | None = None,
    ):
        self.tokenizer, self.eos_ids, self.max_new_tokens = tokenizer, list(eos_ids), int(max_new_tokens)
        self.prune = prune
        self.keep = float((prune or {}).get("keep_ratio", 1.0))
        types = list(qtypes or []) + ["other"]
        self.exact, self.cer = ExactMatchByType(types), CharErrorRateByType(types)
        self.reset()

    def reset(self) -> None:
        self.exact.reset()
        self.cer.reset()
        self.skipped: Counter = Counter()
        self.n = 0
        self.visual_tokens = 0

    def to(self, device) -> Evaluator:
        self.exact.to(device)
        self.cer.to(device)
        return self

    @torch.no_grad()
    def step(self, model: VLM, batch: dict) -> Scored | None:
        """Generate for one batch and score it; None for a batch that only carries skip counts."""
        self.skipped.update(batch.get("skipped") or {})
        if batch.get("empty"):
            return None
        out = generate(
            model,
            batch,
            self.max_new_tokens,
            self.eos_ids,
            suppress_ids=self.tokenizer.structural_ids,
            prune=self.prune,
        )
        preds = [self.tokenizer.decode(o) for o in out]
        self.exact.update(preds, batch["answers"], batch["qtypes"])
        self.cer.update(preds, batch["answers"], batch["qtypes"])
        spans = [
            n for row in media_span_ids(model.is_media(batch["input_ids"])) for n in torch.bincount(row)[1:].tolist()
        ]
        # tokens per media span after pruning: ceil(keep · n), at least one (vlm.model.prune)
        self.visual_tokens += sum(max(1, math.ceil(self.keep * s)) for s in spans) if self.keep < 1 else sum(spans)
        self.n += len(preds)
        return Scored(batch["keys"], batch["qtypes"], batch["prompts"], batch["answers"], preds)

    def compute(self) -> dict:
        """{'metrics': exact match per type + 'mean' + 'overall', 'cer': per type, 'counts': samples
        per type, 'n', 'skipped', 'visual_tokens' (mean per sample)}."""
        metrics = {k: float(v) for k, v in self.exact.compute().items()}
        cer = {k: float(v) for k, v in self.cer.compute().items()}
        counts = {q: int(self.exact.total[i]) for i, q in enumerate(self.exact.qtypes)}
        return {
            "metrics": metrics,
            "cer": cer,
            "counts": counts,
            "n": self.n,
            "skipped": dict(self.skipped),
            "visual_tokens": self.visual_tokens / max(self.n, 1),
        }

    @staticmethod
    def log_items(res: dict) -> dict[str, float]:
        """`compute()`'s result as logged values: val/accuracy (the mean over types), val/acc_<type>,
        val/cer_<type> (partial reading shows here) and val/skipped_<reason>."""
        out = {"val/accuracy" if k == "mean" else f"val/acc_{k}": v for k, v in res["metrics"].items()}
        out.update({f"val/cer_{k}": v for k, v in res["cer"].items()})
        out.update({f"val/skipped_{r}": float(c) for r, c in res["skipped"].items()})
        return out

    def table(self, res: dict | None = None) -> str:
        """A Markdown table: samples, exact match and CER per question type, and the mean."""
        res = res or self.compute()
        rows = ["| question type | n | exact match | character error rate |", "| --- | ---: | ---: | ---: |"]
        for q in self.exact.qtypes:
            if res["counts"][q]:
                c = f"{100 * res['cer'][q]:.1f}%" if q in res["cer"] else "-"
                rows.append(f"| {q} | {res['counts'][q]} | {100 * res['metrics'][q]:.1f}% | {c} |")
        if res["metrics"]:
            rows.append(f"| **mean over types** | {res['n']} | {100 * res['metrics']['mean']:.1f}% | |")
        return "\n".join(rows)
