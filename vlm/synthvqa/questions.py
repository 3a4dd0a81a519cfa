"""Questions and answers: the canonical caption, every valid (question, answer) of a shapes scene,
the seeded draws of qtypes and questions, and the full vocabulary the generator can produce."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping

from vlm.synthvqa.config import SynthConfig
from vlm.synthvqa.scenes import Shape, ShapesScene
from vlm.synthvqa.spec import (
    COLOR_NAMES,
    COUNT_WORDS,
    DIRECTIONS,
    OCR_CHARSET,
    Q_COLOR,
    Q_COUNT_ALL,
    Q_COUNT_SHAPE,
    Q_DESCRIBE,
    Q_EXISTS,
    Q_LEFT_RIGHT,
    Q_MULTI,
    Q_OCR,
    Q_VIDEO,
    SHAPES,
    V1_FAMILIES,
)


def describe(shapes: Iterable[Shape]) -> str:
    """The canonical caption (see the package docstring for the order and wording)."""
    counts = Counter((s.shape, s.color) for s in shapes)
    groups = sorted(counts, key=lambda sc: (SHAPES.index(sc[0]), COLOR_NAMES.index(sc[1])))
    parts = [f"{COUNT_WORDS[counts[g]]} {g[1]} {g[0]}{'s' if counts[g] > 1 else ''}" for g in groups]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def side(s: Shape, canvas: int) -> str | None:
    """``left``/``right`` when the centre is at least canvas/10 from the middle, else None."""
    d = s.cx - canvas / 2
    if abs(d) < canvas / 10:
        return None
    return "left" if d < 0 else "right"


def question_bank(scene: ShapesScene) -> dict[str, list[tuple[str, str]]]:
    """Every valid (question, answer) for a shapes scene, by qtype. ``exists`` is split into
    ``exists_yes`` and ``exists_no`` so the two answers can be drawn 50/50."""
    kinds = Counter(s.shape for s in scene.shapes)
    combos = Counter((s.color, s.shape) for s in scene.shapes)
    bank: dict[str, list[tuple[str, str]]] = {
        "color": [
            (Q_COLOR.format(shape=s.shape), s.color)
            for k in SHAPES
            for s in scene.shapes
            if s.shape == k and kinds[k] == 1
        ],
        "count_shape": [(Q_COUNT_SHAPE.format(shape=k), str(kinds[k])) for k in SHAPES],
        "count_all": [(Q_COUNT_ALL, str(len(scene.shapes)))],
        "exists_yes": [],
        "exists_no": [],
        "left_right": [],
        "describe": [(Q_DESCRIBE, describe(scene.shapes))],
    }
    for k in SHAPES:
        for col in COLOR_NAMES:
            bank["exists_yes" if combos[(col, k)] else "exists_no"].append(
                (Q_EXISTS.format(color=col, shape=k), "yes" if combos[(col, k)] else "no")
            )
            if combos[(col, k)] == 1:
                s = next(s for s in scene.shapes if (s.color, s.shape) == (col, k))
                answer = side(s, scene.canvas)
                if answer is not None:
                    bank["left_right"].append((Q_LEFT_RIGHT.format(color=col, shape=k), answer))
    return bank


def remaining_questions(
    bank: dict[str, list[tuple[str, str]]], qtype: str, asked: set[str]
) -> list[list[tuple[str, str]]]:
    """The not yet ``asked`` (question, answer) pairs of ``qtype`` in ``bank``: one list, or for
    ``exists`` two (the ``yes`` and the ``no`` pool)."""
    keys = ("exists_yes", "exists_no") if qtype == "exists" else (qtype,)
    return [[qa for qa in bank[k] if qa[0] not in asked] for k in keys]


def pick_question(
    rng: random.Random, bank: dict[str, list[tuple[str, str]]], qtype: str, asked: set[str]
) -> tuple[str, str] | None:
    """A random unasked (question, answer) of ``qtype``, or None when none is left."""
    pools = [p for p in remaining_questions(bank, qtype, asked) if p]
    if not pools:
        return None
    # exists: yes/no by a fair coin (while both still have an unasked question)
    pool = pools[0] if len(pools) == 1 else pools[rng.random() >= 0.5]
    return rng.choice(pool)


def draw_qtype(rng: random.Random, weights: dict[str, float], allowed: Iterable[str]) -> str | None:
    """A qtype among ``allowed`` drawn by ``weights`` (None when none has a positive weight)."""
    cands = [q for q in allowed if weights[q] > 0]
    if not cands:
        return None
    return rng.choices(cands, weights=[weights[q] for q in cands])[0]


def vocabulary_texts(cfg: SynthConfig | Mapping | None = None) -> list[str]:
    """Every question and every answer word the generator can produce (for the tokenizer).
    The v2 texts are added only when ``cfg`` enables a v2 family (v1 output is unchanged)."""
    out = [Q_COUNT_ALL, Q_DESCRIBE, Q_OCR, "yes", "no", "left", "right", *COLOR_NAMES]
    out += [str(i) for i in range(len(COUNT_WORDS))] + list(OCR_CHARSET)
    for k in SHAPES:
        out += [Q_COLOR.format(shape=k), Q_COUNT_SHAPE.format(shape=k)]
        for col in COLOR_NAMES:
            out += [Q_EXISTS.format(color=col, shape=k), Q_LEFT_RIGHT.format(color=col, shape=k)]
            out += [f"{COUNT_WORDS[n]} {col} {k}{'s' if n > 1 else ''}" for n in range(1, len(COUNT_WORDS))]
    out.append("one red circle, two green squares, three blue triangles and four yellow circles")
    families = SynthConfig.from_any(cfg).families if cfg is not None else V1_FAMILIES
    if "multi_image" in families:
        out += [Q_MULTI, "first", "second"]
    if "video" in families:
        out += [*DIRECTIONS] + [Q_VIDEO.format(color=col, shape=k) for k in SHAPES for col in COLOR_NAMES]
    return out
