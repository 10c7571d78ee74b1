"""Metrics with hand-checked values, computed as the official LoGo code computes them."""

from __future__ import annotations

import math

import pytest

from logo.eval.metrics import aggregate, bleu, exact_match, exact_match_multi, headline, rouge, score_instance


def test_exact_match_official_normalisation():
    assert exact_match(" True. ", "true") == 1
    assert exact_match("(A)", "(a)") == 1
    assert exact_match("3.5", "35") == 1  # the official code removes every '.'
    assert exact_match("False", "True") == 0
    assert exact_match_multi("Paris.", ["paris", "City of Paris"]) == 1
    assert exact_match_multi("Lyon", ["paris"]) == 0


def test_bleu_hand_checked():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 -> method1 epsilon 0.1/3; brevity penalty 1
    expected = math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)) / 4)
    assert bleu("the cat sat on the mat", "the cat is on the mat") == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.2541, abs=1e-4)


def test_rouge_hand_checked():
    assert rouge("the cat sat", "the cat sat") == pytest.approx({"rouge-1": 1.0, "rouge-2": 1.0, "rouge-L": 1.0})
    got = rouge("the cat", "the cat sat on the mat")
    assert got["rouge-1"] == pytest.approx(0.5)  # P = 1, R = 2/6
    assert got["rouge-2"] == pytest.approx(2 * 1 * 0.2 / 1.2)  # P = 1, R = 1/5
    assert rouge("cats running", "cat runs")["rouge-1"] == pytest.approx(1.0)  # stemming
    empty = rouge("", "abc")  # rouge_score gives the int 0 here: results files hold floats only
    assert empty == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-L": 0.0}
    assert all(type(v) is float for v in empty.values())


def test_aggregate_and_headline():
    assert aggregate([1, 0, 1, 1]) == {"score": 0.75}
    assert headline("em", [1, 0, 1, 1]) == ("Accuracy", 75.0)
    r = [{"rouge-1": 1.0, "rouge-2": 0.5, "rouge-L": 0.5}, {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-L": 0.25}]
    assert headline("rouge", r) == ("ROUGE-L", pytest.approx(37.5))
    assert score_instance("em_multi", "x", "x") == 1
    with pytest.raises(ValueError, match="unknown metric"):
        score_instance("f1", "a", "b")


def test_degenerate_predictions_score_zero():
    assert bleu("", "the cat sat") == 0.0
    assert rouge("", "the cat sat") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-L": 0.0}
    assert exact_match("", "True") == 0
    assert aggregate([]) == {}
