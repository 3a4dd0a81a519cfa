"""Answer metrics: exact match and character error rate per question type."""

from __future__ import annotations

import pytest
import torch

from vlm.evaluation.metrics import CharErrorRateByType, ExactMatchByType, edit_distance


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("", "", 0),
        ("ABC", "ABC", 0),
        ("", "ABC", 3),
        ("ABC", "", 3),
        ("ABC", "ABD", 1),  # one substitution
        ("ABC", "AC", 1),  # one deletion
        ("AC", "ABC", 1),  # one insertion
        ("KITTEN", "SITTING", 3),
        ("ABCDEF", "BCDEFA", 2),  # a shifted string: delete at the front, insert at the back
    ],
)
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_cer_per_type_is_edits_over_reference_characters():
    m = CharErrorRateByType(["ocr", "ocr_wide", "other"])
    m.update(["AB3", "", "XYZW.", "left"], ["AB9", "QRST", "XYZW", "right"], ["ocr", "ocr", "ocr_wide", "mystery"])
    out = m.compute()
    assert out["ocr"] == pytest.approx((1 + 4) / (3 + 4))  # a wrong character, a missed string
    assert out["ocr_wide"] == 0.0  # trailing period and spaces are normalised away
    assert out["other"] == pytest.approx(edit_distance("left", "right") / 5)  # unknown types count as other
    assert set(out) == {"ocr", "ocr_wide", "other"}


def test_cer_leaves_out_unseen_types_and_counts_without_other():
    m = CharErrorRateByType(["ocr", "video"])
    m.update(["AB"], ["AB"], ["color"])  # no "other" bucket: not counted anywhere
    assert m.compute() == {}
    m.update(["ABCDEFG"], ["AB"], ["ocr"])  # a long wrong answer: CER above 1
    assert m.compute()["ocr"] == pytest.approx(5 / 2)


def test_exact_match_and_cer_agree_on_all_right_and_all_wrong():
    em, cer = ExactMatchByType(["ocr"]), CharErrorRateByType(["ocr"])
    for m in (em, cer):
        m.update(["ABC", "XYZ"], ["ABC", "XYZ"], ["ocr", "ocr"])
    assert em.compute()["ocr"] == 1.0 and cer.compute()["ocr"] == 0.0
    em.reset(), cer.reset()
    for m in (em, cer):
        m.update(["", ""], ["ABC", "XY"], ["ocr", "ocr"])
    assert em.compute()["ocr"] == 0.0 and cer.compute()["ocr"] == 1.0
    assert isinstance(cer.compute()["ocr"], torch.Tensor)


def test_exact_match_counts_unknown_types_as_other_only_when_listed():
    m = ExactMatchByType(["ocr", "other"])
    m.update(["AB.", "left", "x"], ["AB", "left", "y"], ["ocr", "mystery", None])
    out = m.compute()
    assert out["ocr"] == 1.0 and out["other"] == 0.5 and out["overall"] == pytest.approx(2 / 3)
    assert out["mean"] == pytest.approx(0.75)
    m = ExactMatchByType(["ocr"])
    m.update(["left"], ["left"], ["mystery"])
    assert m.compute() == {}
