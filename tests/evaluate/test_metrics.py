"""Reference (3): metric functions against cases worked out by hand."""

import math

import pytest

from glm130b.evaluate.metrics import (
    MICRO_RATIOS,
    best_over_references,
    bits_per_byte,
    exact_match,
    group_statistics,
    micro_counts,
    normalize_answer,
    perplexity,
    stereoset_scores,
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


def test_micro_precision_recall_f1_by_hand():
    labels = [0, 0, 1, 1, 2, 2, 2]
    predictions = [0, 1, 1, 2, 2, 2, 0]
    # class 0: TP 1 (item 0), FP 1 (item 6), FN 1 (item 1)
    # class 1: TP 1 (item 2), FP 1 (item 1), FN 1 (item 3)
    # class 2: TP 2 (items 4, 5), FP 1 (item 3), FN 1 (item 6)
    # summed: TP 4, predicted = TP + FP = 7, actual = TP + FN = 7
    assert micro_counts(labels, predictions) == (4, 7, 7)
    ratio = {name: rule(*micro_counts(labels, predictions)) for name, rule in MICRO_RATIOS.items()}
    # P = 4/7, R = 4/7, F1 = 2 x 4 / (7 + 7) = 4/7: each the accuracy, 4 of 7 right
    assert ratio == {"Precision": (4, 7), "Recall": (4, 7), "F1_mul": (8, 14)}
    # the counts add up over items, so each item can be a unit of the bootstrap
    per_item = [micro_counts([y], [p]) for y, p in zip(labels, predictions)]
    assert tuple(map(sum, zip(*per_item))) == (4, 7, 7)
    # the formulas where the counts differ (as with several labels per item): TP 2, predicted 4,
    # actual 5: P = 2/4, R = 2/5, F1 = 2PR / (P + R) = 0.4 / 0.9 = 4/9 = 2 x 2 / (4 + 5)
    p_num, p_den = MICRO_RATIOS["Precision"](2, 4, 5)
    r_num, r_den = MICRO_RATIOS["Recall"](2, 4, 5)
    f_num, f_den = MICRO_RATIOS["F1_mul"](2, 4, 5)
    assert (p_num / p_den, r_num / r_den, f_num / f_den) == pytest.approx((0.5, 0.4, 4 / 9))


def test_stereoset_scores_by_hand():
    # 3 stereotype, 1 anti-stereotype, 1 unrelated of 5: LMS 4/5 = 80, SS 3/4 = 75, ICAT 80 x 25 / 50 = 40
    assert stereoset_scores(3, 1, 5) == pytest.approx((80.0, 75.0, 40.0))
    # 1 stereotype, 3 anti of 4: LMS 100, SS 25, ICAT 100 x 25 / 50 = 50
    assert stereoset_scores(1, 3, 4) == pytest.approx((100.0, 25.0, 50.0))
    # only unrelated predictions: SS is 0 (the official rule), so ICAT is 0
    assert stereoset_scores(0, 0, 2) == pytest.approx((0.0, 0.0, 0.0))


def test_bootstrap_interval_of_a_pair_numerator():
    # 100 stereotype and 100 anti-stereotype predictions: ICAT 100, the most any resample reaches
    counts = [[1.0, 0.0], [0.0, 1.0]] * 100
    icat = UnitScores("icat", counts, [1.0] * 200)
    assert icat.value() == pytest.approx(100.0)
    low, high = bootstrap_interval(icat)
    assert high == pytest.approx(100.0) and 80.0 < low < 99.0
    # SS 50 +- 1.96 x sqrt(0.25 / 200) x 100 = 50 +- 6.9
    low, high = bootstrap_interval(UnitScores("ss", counts, [1.0] * 200))
    assert low == pytest.approx(43.1, abs=1.5) and high == pytest.approx(56.9, abs=1.5)


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
