"""What a grid shows: its runs grouped per setting (mean and spread over seeds) and a summary in
plain words, including when it shows nothing.

A switch "shows a difference" when the gap between its best and worst value's mean loss is more
than twice the seed-to-seed spread (the pooled standard deviation over seeds of one setting):
smaller gaps are what reseeding alone produces.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from glm130b.ablation.grid import Grid
from glm130b.ablation.outcomes import RunOutcome
from glm130b.ablation.spikes import SpikeRule

NOISE_MULTIPLE = 2.0  # a gap must exceed this many seed standard deviations to count (see above)


@dataclass
class SettingStats:
    setting: dict[str, str]
    outcomes: list[RunOutcome]  # its finished runs, one per seed

    @property
    def diverged(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.divergence]

    def scores(self) -> list[float]:
        """The loss the grid compares runs by (see score()) of the runs that did not diverge."""
        return [s for o in self.outcomes if not o.divergence and math.isfinite(s := score(o))]


def score(outcome: RunOutcome) -> float:
    """Final validation loss; the final training loss when the grid has no validation data."""
    valid = outcome.valid_loss
    return valid if valid is not None else outcome.final_train_loss


def score_name(outcomes: list[RunOutcome]) -> str:
    if any(o.valid_loss is not None for o in outcomes):
        return "final validation loss"
    return "final train loss (mean over the last tenth of the steps: the grid has no validation data)"


def by_setting(grid: Grid, outcomes: list[RunOutcome]) -> list[SettingStats]:
    groups = {tuple(s.values()): SettingStats(s, []) for s in grid.settings()}
    for outcome in outcomes:
        groups[tuple(outcome.run.setting.values())].outcomes.append(outcome)
    return list(groups.values())


def seed_spread(stats: list[SettingStats]) -> float | None:
    """Pooled standard deviation over seeds: sqrt of the mean per-setting variance (settings with 2+ scores)."""
    variances = [statistics.variance(s) for s in (st.scores() for st in stats) if len(s) >= 2]
    return math.sqrt(statistics.fmean(variances)) if variances else None


def mean_spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean_range(values: list[float]) -> str:
    if not values:
        return "–"
    if min(values) == max(values):
        return f"{values[0]:g}"
    return f"{statistics.fmean(values):.3g} ({min(values):g}–{max(values):g})"


def label(setting: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def summarize(grid: Grid, outcomes: list[RunOutcome], rule: SpikeRule) -> list[str]:
    """The plain-language summary, one paragraph per finding."""
    if not outcomes:
        return ["No run has finished yet: nothing to compare."]
    stats = by_setting(grid, outcomes)
    paragraphs = [_scale(grid, outcomes)]
    paragraphs.append(_divergence(stats, len(outcomes)))
    paragraphs.append(_spikes(grid, outcomes, rule))
    if any(o.run.config.precision == "fp16" for o in outcomes):
        fp16 = [o.loss_scale_skips for o in outcomes if o.run.config.precision == "fp16"]
        paragraphs.append(
            f"Loss-scale overflows skipped {mean_range(fp16)} updates per fp16 run "
            "(mean, min–max); the skipped steps come on top of the planned ones."
        )
    if grid.base.spike_guard.enabled:
        total = sum(o.interventions for o in outcomes)
        where = [
            f"{label(s.setting)}: {sum(o.interventions for o in s.outcomes)}"
            for s in stats
            if any(o.interventions for o in s.outcomes)
        ]
        paragraphs.append(
            "The spike guard never rolled a run back."
            if not total
            else f"The spike guard rolled back {total} times in all ({'; '.join(where)})."
        )
    else:
        paragraphs.append("The spike guard was off (spike_guard.enabled: false): no run was rolled back.")
    effects = [_effect(axis, outcomes, stats) for axis, values in grid.axes.items() if len(values) > 1]
    paragraphs += [text for text, _ in effects]
    paragraphs += _identical(grid, outcomes)
    if not any(s.diverged for s in stats) and not any(o.verdict.events for o in outcomes):
        calm = "no run diverged and no loss spiked"
        if any(o.grad_spikes for o in outcomes):
            calm += " (gradient norms spiked, as counted above, without the loss following)"
        if any(shown for _, shown in effects):
            quiet = f"{calm}: on stability itself it shows nothing more"
        elif seed_spread(stats) is None:
            quiet = f"{calm}, and with one seed per setting no loss difference can be told from seed noise"
        else:
            quiet = f"{calm}, and no switch moved the loss beyond seed noise: it shows nothing"
        paragraphs.append(
            f"At this scale {quiet}. That is no evidence against the paper's choices, whose failures "
            "it reports at tens of billions of parameters and more; --lr-multiplier, a shorter warmup "
            "(--warmup-multiplier) or a larger model bring instability closer."
        )
    if len(outcomes) < len(grid.runs()):
        paragraphs.append(
            f"Only {len(outcomes)} of the {len(grid.runs())} runs have finished; run the same command "
            "again to train the rest (finished runs are kept)."
        )
    return paragraphs


def _scale(grid: Grid, outcomes: list[RunOutcome]) -> str:
    base = grid.base
    steps = max(o.result["steps"] for o in outcomes)
    tokens = base.train_samples * base.sequence_length
    sizes = sorted({o.result["parameters"] for o in outcomes})  # sandwich adds two LayerNorms a layer
    size = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,} to {sizes[-1]:,}"
    return (
        f"Scale: {size}-parameter models, up to {steps} steps of at most "
        f"{base.global_batch_size} sequences of {base.sequence_length} tokens ({tokens:,} token positions per "
        f"run), peak learning rate {base.lr:g} with warmup over {base.warmup_samples} samples."
    )


def _divergence(stats: list[SettingStats], finished: int) -> str:
    diverged = [s for s in stats if s.diverged]
    if not diverged:
        return f"No run diverged (none of {finished} had a non-finite loss or a loss that never came back down)."
    count = sum(len(s.diverged) for s in diverged)
    parts = [
        f"{label(s.setting)}: {len(s.diverged)} of {len(s.outcomes)} seeds ({s.diverged[0].divergence})"
        for s in diverged
    ]
    return f"{count} of {finished} runs diverged: " + "; ".join(parts) + "."


def _spikes(grid: Grid, outcomes: list[RunOutcome], rule: SpikeRule) -> str:
    return (
        _events("spike events", lambda o: o.verdict.events, grid, outcomes, rule.factor, rule)
        + " "
        + _events("gradient-norm spikes", lambda o: o.grad_spikes, grid, outcomes, rule.grad_factor, rule)
    )


def _events(what: str, events, grid: Grid, outcomes: list[RunOutcome], factor: float, rule: SpikeRule) -> str:
    """One sentence on the events of one curve: none, or their count per value of each switch."""
    rule_text = f"above {factor:g} x the median of the last {rule.window} healthy steps"
    total = sum(len(events(o)) for o in outcomes)
    if not total:
        return f"No {what} ({rule_text}) in any run."
    parts = []
    for axis, values in grid.axes.items():
        if len(values) > 1:
            counts = {v: sum(len(events(o)) for o in outcomes if o.run.setting[axis] == v) for v in values}
            parts.append(f"{axis} " + ", ".join(f"{v}: {n}" for v, n in counts.items()))
    return f"{total} {what} ({rule_text}) in all" + (f"; by {'; '.join(parts)}." if parts else ".")


def _effect(axis: str, outcomes: list[RunOutcome], stats: list[SettingStats]) -> tuple[str, bool]:
    """The sentence on one switch's effect on the score, and whether it shows a difference."""
    levels: dict[str, list[float]] = defaultdict(list)
    for st in stats:
        levels[st.setting[axis]] += st.scores()
    means = {v: statistics.fmean(s) for v, s in levels.items() if s}
    what = score_name(outcomes)
    if len(means) < 2:
        return f"{axis}: too few runs that did not diverge to compare its values by {what}.", False
    text = (
        f"{axis}: {what} "
        + ", ".join(f"{v} {m:.3f}" for v, m in means.items())
        + " (mean over the other switches and the seeds, runs that diverged left out)."
    )
    best, worst = min(means, key=means.get), max(means, key=means.get)
    gap, spread = means[worst] - means[best], seed_spread(stats)
    if spread is None:
        return (
            text + f" The gap {worst} - {best} is {gap:.3f}; one seed per setting gives no spread to judge it by.",
            False,
        )
    if gap > NOISE_MULTIPLE * spread:
        return (
            text + f" {best} beats {worst} by {gap:.3f}, {gap / spread:.1f} x the seed-to-seed spread "
            f"({spread:.3f}): a difference at this scale."
        ), True
    return (
        text + f" The largest gap, {gap:.3f}, is within {NOISE_MULTIPLE:g} x the seed-to-seed spread "
        f"({spread:.3f}): no difference shown."
    ), False


def _identical(grid: Grid, outcomes: list[RunOutcome]) -> list[str]:
    """Switches that changed nothing: runs differing only in them have bit-identical loss curves
    (the softmax switch in an fp32 run, where the compute dtype already is fp32)."""
    curves = {(tuple(o.run.setting.items()), o.run.seed_index): [repr(v) for v in o.losses] for o in outcomes}
    notes = []
    for axis, values in grid.axes.items():
        if len(values) < 2:
            continue
        same_where = []
        for setting in grid.settings():
            if setting[axis] != values[0]:
                continue
            variants = [tuple({**setting, axis: v}.items()) for v in values]
            seeds = [i for i in range(grid.seeds) if all((k, i) in curves for k in variants)]
            if seeds and all(curves[(k, i)] == curves[(variants[0], i)] for k in variants for i in seeds):
                same_where.append(label({k: v for k, v in setting.items() if k != axis}) or "every run")
        if same_where:
            notes.append(
                f"Runs differing only in {axis} had bit-identical loss curves where "
                f"{'; '.join(same_where)}: the switch changes nothing there."
            )
    return notes
