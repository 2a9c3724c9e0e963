"""Reference (3): metric functions against cases worked out by hand."""

import math

import pytest

from glm130b.evaluate.metrics import (
    best_over_references,
    bits_per_byte,
    exact_match,
    group_statistics,
    normalize_answer,
    perplexity,
    stripped_match,
    token_f1,
    word_count,
)
from glm130b.evaluate.scores import UnitScores
from glm130b.evaluate.significance import bootstrap_interval, paired_bootstrap


def test_squad_normalisation():
    assert normalize_answer("  The Cat, sat on  a MAT! ") == "cat sat on mat"
    assert normalize_answer("An apple-pie") == "applepie"  # punctuation goes before the articles
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_by_hand():
    assert exact_match("The Eiffel tower.", "eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    # prediction {cat, sat}, reference {cat, sat, on, mat}: precision 2/2, recall 2/4, F1 = 2*1*0.5/1.5
    assert token_f1("the cat sat", "a cat sat on the mat") == pytest.approx(2 / 3)
    # words count with multiplicity: [x, x, y] and [x, y, y] share one x and one y: P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("nothing", "else") == 0.0
    assert best_over_references(token_f1, "cat", ["dog", "the cat"]) == 1.0
    assert best_over_references(exact_match, "cat", []) == 0.0


def test_lambada_match_strips_only():
    assert stripped_match(" Harlin ", "Harlin") == 1.0
    assert stripped_match("harlin", "Harlin") == 0.0


def test_perplexity_and_bits_per_byte_by_hand():
    assert perplexity(nll=6.0, words=3) == pytest.approx(math.e**2)
    assert perplexity(nll=1000.0, words=1) == pytest.approx(math.exp(20))  # the official cap
    assert bits_per_byte(nll=math.log(2) * 8, n_bytes=4) == pytest.approx(2.0)
    assert word_count("  a b  c \n") == 4  # split at single spaces: "a", "b", "", "c"


def test_group_statistics_by_hand():
    stats = group_statistics([50.0, 80.0, 20.0], weights=[1, 3, 1])
    assert stats == {"max": 80.0, "median": 50.0, "weighted_mean": pytest.approx((50 + 240 + 20) / 5)}


def test_bootstrap_interval():
    constant = UnitScores("mean100", [1.0] * 50, [1.0] * 50)
    assert bootstrap_interval(constant) == (100.0, 100.0)
    half = UnitScores("mean100", [1.0, 0.0] * 200, [1.0] * 400)
    low, high = bootstrap_interval(half)
    # normal approximation: 50 +- 1.96 * sqrt(0.25 / 400) * 100 = 50 +- 4.9
    assert low == pytest.approx(45.1, abs=1.0) and high == pytest.approx(54.9, abs=1.0)
    ratio = UnitScores("ppl", [2.0, 4.0], [1.0, 2.0])
    assert ratio.value() == pytest.approx(math.exp(2.0))


def test_paired_bootstrap():
    a = UnitScores("mean100", [1.0, 0.0] * 100, [1.0] * 200)
    same = paired_bootstrap(a, a)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
    better = UnitScores("mean100", [1.0, 1.0] * 100, [1.0] * 200)  # right wherever a was, and on 100 more
    result = paired_bootstrap(a, better)
    assert result["difference"] == pytest.approx(50.0) and result["p_value"] < 0.01
    assert result["interval"][0] > 40
    one_more = UnitScores("mean100", [1.0, 0.0] * 99 + [1.0, 1.0], [1.0] * 200)  # one item of 200
    assert paired_bootstrap(a, one_more)["p_value"] > 0.2
