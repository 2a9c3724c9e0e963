"""What one finished run of a grid shows, read from its metrics files and result: its curves,
loss-scale skips, spike-guard interventions, spike events, divergence, final losses."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from glm130b.ablation.grid import GridRun
from glm130b.ablation.runner import read_result, run_folder
from glm130b.ablation.spikes import CurveVerdict, SpikeEvent, SpikeRule, find_spikes
from glm130b.train.metrics import read_metrics
from glm130b.train.report import last_per_step

# The final training loss is the mean over the last tenth of the steps: one step's loss is one
# batch's, too noisy to compare runs by.
FINAL_SHARE = 0.1


@dataclass
class RunOutcome:
    run: GridRun
    result: dict  # runner.train_run's result.json
    steps: list[int]
    losses: list[float]
    grad_norms: list[float]
    loss_scale_skips: int  # fp16 steps whose update was skipped for an overflow
    interventions: int  # spike-guard rollbacks
    verdict: CurveVerdict  # of the loss curve
    grad_spikes: list[SpikeEvent]  # of the gradient-norm curve

    @property
    def divergence(self) -> str | None:
        if self.result.get("stopped"):
            return f"stopped by the spike guard: {self.result['stopped']}"
        return self.verdict.divergence

    @property
    def valid_loss(self) -> float | None:
        """The final validation loss, averaged over the validation sets; None without validation."""
        losses = list((self.result.get("valid_loss") or {}).values())
        return statistics.fmean(losses) if losses else None

    @property
    def final_train_loss(self) -> float:
        tail = self.losses[-max(1, round(FINAL_SHARE * len(self.losses))) :]
        return statistics.fmean(tail) if tail and all(math.isfinite(v) for v in tail) else math.nan


def read_outcome(run: GridRun, rule: SpikeRule) -> RunOutcome | None:
    """The outcome of `run`, None while it is not finished."""
    result = read_result(run)
    if result is None:
        return None
    metrics = run_folder(run) / "metrics"
    train = last_per_step(read_metrics(metrics, "train"))  # a step replayed after a rollback counts once
    steps, losses = [r["step"] for r in train], [float(r["loss"]) for r in train]
    # fp16 overflow steps have an infinite norm by definition: the loss scaler's business, not a spike
    norms = [(s, float(r["grad_norm"])) for s, r in zip(steps, train) if not r.get("skipped_update")]
    return RunOutcome(
        run=run,
        result=result,
        steps=steps,
        losses=losses,
        grad_norms=[float(r["grad_norm"]) for r in train],
        loss_scale_skips=sum(bool(r.get("skipped_update")) for r in train),
        interventions=len(read_metrics(metrics, "intervention")),
        verdict=find_spikes(steps, losses, rule),
        grad_spikes=find_spikes(
            [s for s, _ in norms], [n for _, n in norms], dataclasses.replace(rule, factor=rule.grad_factor)
        ).events,
    )
