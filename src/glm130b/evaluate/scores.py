"""What scoring a file yields: one record per item (or lm window) for the results file, and per
metric the per-unit numerators and denominators that the metric, its bootstrap interval and the
paired comparison are all computed from (glm130b.evaluate.significance)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from glm130b.evaluate.metrics import PPL_EXPONENT_CAP, stereoset_scores

STEREOSET_KINDS = ("lms", "ss", "icat")


def transform(kind: str, ratio: np.ndarray | float):
    if kind == "mean100":
        return 100.0 * ratio
    if kind == "ppl":
        return np.exp(np.minimum(PPL_EXPONENT_CAP, ratio))
    if kind == "bpb":
        return ratio / math.log(2)
    if kind in STEREOSET_KINDS:  # ratio [..., 2]: the stereotype and anti-stereotype shares of predictions
        return stereoset_scores(ratio[..., 0], ratio[..., 1], 1.0)[STEREOSET_KINDS.index(kind)]
    raise ValueError(f"unknown metric kind {kind!r}")


@dataclass
class UnitScores:
    """Per-unit numerators and denominators of one metric, and how the ratio becomes the metric. A
    numerator is a number, or for StereoSet's kinds a pair (stereotype, anti-stereotype predictions)."""

    kind: str  # mean100 | ppl | bpb | lms | ss | icat
    num: list[float] | list[list[float]]
    den: list[float]

    def value(self) -> float:
        return float(transform(self.kind, np.sum(self.num, axis=0) / sum(self.den)))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num": self.num, "den": self.den}

    @classmethod
    def from_dict(cls, data: dict) -> UnitScores:
        return cls(data["kind"], list(data["num"]), list(data["den"]))

    @classmethod
    def pooled(cls, parts: list[UnitScores]) -> UnitScores:
        """The units of several files as one set (a group's or a task's pooled score)."""
        return cls(parts[0].kind, [x for p in parts for x in p.num], [x for p in parts for x in p.den])


@dataclass
class FileOutcome:
    records: list[dict]  # one per item (or lm window), saved in the results
    scores: dict[str, UnitScores]  # per metric
    # category -> metric -> scores: BPB per Pile subset, CP or LMS / SS / ICAT per bias type
    breakdown: dict[str, dict[str, UnitScores]] = field(default_factory=dict)
