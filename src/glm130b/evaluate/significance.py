"""Bootstrap intervals and paired bootstrap tests over scored units (items, or lm windows).

Every metric is a transform of a ratio of sums over units, `f(sum(num) / sum(den))`: accuracy,
EM and F1 are 100 x the mean of per-item scores (den = 1), perplexity exp(NLL / words), bits
per byte NLL / bytes / ln 2, StereoSet's scores a function of the summed pair (stereotype,
anti-stereotype predictions) over the items. Resampling units with replacement and recomputing
that ratio gives the interval; resampling the same units of two runs gives the paired test.
"""

from __future__ import annotations

import numpy as np

from glm130b.evaluate.scores import UnitScores, transform

RESAMPLES = 1000  # enough for a 95 % interval to ~0.1 point on a few hundred items
CONFIDENCE = 0.95
SEED = 0  # fixed: the same results give the same interval
CHUNK = 100


def _resampled_ratios(scores: list[UnitScores], resamples: int, seed: int) -> list[np.ndarray]:
    """The ratio of each score set on the same `resamples` draws of unit indices [resamples] each,
    drawn CHUNK resamples at a time so memory stays ~CHUNK x units (MMLU: 14k units)."""
    n = len(scores[0].num)
    rng = np.random.default_rng(seed)
    arrays = [(np.asarray(s.num, dtype=np.float64), np.asarray(s.den, dtype=np.float64)) for s in scores]
    out = [[] for _ in scores]
    for start in range(0, resamples, CHUNK):
        index = rng.integers(0, n, size=(min(CHUNK, resamples - start), n))
        for parts, (num, den) in zip(out, arrays):
            # num[index] is [draws, units] or, for a pair numerator, [draws, units, 2]; the ratio keeps the pair
            parts.append((num[index].sum(1).T / den[index].sum(1)).T)
    return [np.concatenate(parts) for parts in out]


def bootstrap_interval(
    scores: UnitScores, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the metric (over units resampled with replacement)."""
    if len(scores.num) < 2:
        value = scores.value()
        return value, value
    [ratios] = _resampled_ratios([scores], resamples, seed)
    values = transform(scores.kind, ratios)
    tail = (1.0 - confidence) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def paired_bootstrap(a: UnitScores, b: UnitScores, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Difference b - a of one metric over the same units, its interval, and a two-sided p-value:
    the share of resampled differences at least as far from the observed one as the observed one is
    from 0 (the bootstrap distribution shifted to the null hypothesis of no difference)."""
    if len(a.num) != len(b.num) or a.kind != b.kind:
        raise ValueError("paired scores must cover the same units with the same metric")
    observed = b.value() - a.value()
    ra, rb = _resampled_ratios([a, b], resamples, seed)
    diffs = transform(b.kind, rb) - transform(a.kind, ra)
    p = float(np.mean(np.abs(diffs - observed) >= abs(observed))) if observed != 0 else 1.0
    tail = (1.0 - CONFIDENCE) / 2
    return {
        "difference": observed,
        "interval": [float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))],
        "p_value": p,
    }
