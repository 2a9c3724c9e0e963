"""Metric functions (SPEC.md section 9): per-item scores, file metrics, group statistics.

Accuracy, EM and F1 are means of per-item scores x 100 (so the bootstrap can resample items);
EM and F1 compare after SQuAD normalisation and take the best reference. Precision, recall and F1
of mul tasks are micro-averaged from counts that add up over items. Perplexity and bits per byte
come from summed negative log-likelihoods. StereoSet's scores come from prediction counts.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np

# The official perplexity clamps the exponent at 20 (exp(20) ~ 4.9e8), so a diverged model prints a
# number instead of inf.
PPL_EXPONENT_CAP = 20.0
PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, then the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall over the normalised words (bag of words)."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references: list[str]) -> float:
    return max((metric(prediction, r) for r in references), default=0.0)


def stripped_match(prediction: str, reference: str) -> float:
    """LAMBADA's rule: the texts equal after strip() (no other normalisation)."""
    return float(prediction.strip() == reference.strip())


def micro_counts(labels: list, predictions: list) -> tuple[int, int, int]:
    """Summed over every class c that occurs: true positives (label c, predicted c), predicted
    positives (predicted c) and actual positives (label c), the counts of micro averaging."""
    classes = set(labels) | set(predictions)
    true_positives = sum(sum(1 for y, p in zip(labels, predictions) if y == p == c) for c in classes)
    predicted = sum(predictions.count(c) for c in classes)
    actual = sum(labels.count(c) for c in classes)
    return true_positives, predicted, actual


# Micro-averaged precision, recall and F1 (sklearn's average="micro") as (numerator, denominator)
# of the summed counts (true positives, predicted, actual); F1 = 2PR / (P + R) = 2TP / (predicted + actual).
# With one label and one prediction per item, predicted = actual = items: all three equal accuracy.
MICRO_RATIOS = {
    "Precision": lambda true_positives, predicted, actual: (true_positives, predicted),
    "Recall": lambda true_positives, predicted, actual: (true_positives, actual),
    "F1_mul": lambda true_positives, predicted, actual: (2 * true_positives, predicted + actual),
}


def stereoset_scores(stereotype, anti_stereotype, total):
    """StereoSet's language model score LMS (the share of predictions that are the stereotype or the
    anti-stereotype, not the unrelated choice), stereotype score SS (the stereotype's share of
    those; 0 when there are none) and ICAT = LMS x min(SS, 100 - SS) / 50, all x100. Prediction
    counts, or arrays of them."""
    related = np.add(stereotype, anti_stereotype, dtype=np.float64)
    lms = 100.0 * related / total
    ss = 100.0 * np.divide(stereotype, related, out=np.zeros_like(related), where=related > 0)
    return lms, ss, lms * np.minimum(ss, 100.0 - ss) / 50.0


def mean_percent(scores: list[float]) -> float:
    return 100.0 * sum(scores) / max(len(scores), 1)


def perplexity(nll: float, words: float) -> float:
    """Word perplexity: exp(total NLL / words), the exponent capped as the official code does."""
    return math.exp(min(PPL_EXPONENT_CAP, nll / words))


def bits_per_byte(nll: float, n_bytes: float) -> float:
    return nll / n_bytes / math.log(2)


def word_count(text: str) -> int:
    """The official count: pieces of the stripped text split at single spaces."""
    return len(text.strip().split(" "))


def group_statistics(values: list[float], weights: list[float]) -> dict[str, float]:
    """Over the files of a group: max, median, and the mean weighted by item count."""
    return {
        "max": float(np.max(values)),
        "median": float(np.median(values)),
        "weighted_mean": float(np.average(values, weights=weights)),
    }
