"""Tests for answer metrics (flminillm.metrics)."""

from __future__ import annotations

import pytest

from flminillm.metrics import exact_match, normalize_answer, rouge_l, score_predictions


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("  FR  ", "fr"),
        ("Yen.", "yen"),
        ("cat   cat!", "cat cat"),
        ("52\nQ: next question", "52"),
        ("\n  42?!\nmore", "42"),
        ("Pound\tSterling ...", "pound sterling"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_exact_match() -> None:
    assert exact_match(" fr.", "FR") == 1.0
    assert exact_match("Yen\nQ: Which currency", "Yen") == 1.0
    assert exact_match("cat", "cat cat") == 0.0
    assert exact_match("4", "42") == 0.0


def test_rouge_l_hand_computed() -> None:
    # LCS 2: precision 2/3, recall 1 -> F = 2 * (2/3) / (5/3) = 0.8
    assert rouge_l("the cat sat", "the cat") == pytest.approx(0.8)
    # LCS 1 ("b"): precision 1/2, recall 1/2 -> 0.5
    assert rouge_l("a b", "b c") == pytest.approx(0.5)
    assert rouge_l("Pound Sterling", "pound sterling") == pytest.approx(1.0)
    assert rouge_l("dog", "cat") == 0.0


def test_score_predictions() -> None:
    scores = score_predictions(["FR", "the cat sat", "52"], ["fr", "the cat", "17"])
    assert scores["n"] == 3
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)


def test_score_predictions_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        score_predictions([], [])
    with pytest.raises(ValueError):
        score_predictions(["a"], ["a", "b"])
