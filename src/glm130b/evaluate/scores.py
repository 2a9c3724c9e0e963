"""What scoring a file yields: one record per item (or lm window) for the results file, and per
metric the per-unit numerators and denominators that the metric, its bootstrap interval and the
paired comparison are all computed from (glm130b.evaluate.significance)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from glm130b.evaluate.metrics import PPL_EXPONENT_CAP


def transform(kind: str, ratio: np.ndarray | float):
    if kind == "mean100":
        return 100.0 * ratio
    if kind == "ppl":
        return np.exp(np.minimum(PPL_EXPONENT_CAP, ratio))
    if kind == "bpb":
        return ratio / math.log(2)
    raise ValueError(f"unknown metric kind {kind!r}")


@dataclass
class UnitScores:
    """Per-unit numerators and denominators of one metric, and how the ratio becomes the metric."""

    kind: str  # mean100 | ppl | bpb
    num: list[float]
    den: list[float]

    def value(self) -> float:
        return float(transform(self.kind, sum(self.num) / sum(self.den)))

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
    breakdown: dict[str, UnitScores] = field(default_factory=dict)  # e.g. BPB per Pile subset
