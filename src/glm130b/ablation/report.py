"""The grid's report: REPORT.md (what ran, the summary in plain words, a table per setting with mean
and spread over seeds, a line per run) and curves.png (every run's loss and gradient norm, overlaid).
matplotlib is optional (the `demo` extra): without it the report says the figure is missing."""

from __future__ import annotations

import math
from pathlib import Path

from glm130b.ablation.findings import by_setting, label, mean_range, mean_spread, summarize
from glm130b.ablation.grid import RUNS_DIR, SWITCHES, Grid
from glm130b.ablation.outcomes import RunOutcome, read_outcome
from glm130b.ablation.spikes import SpikeRule
from glm130b.train.report import markdown_table, save_png, write_report

REPORT_FILE = "REPORT.md"
CURVES_FILE = "curves.png"


def write_grid_report(grid: Grid, rule: SpikeRule, command: str | None = None) -> Path:
    """REPORT.md and curves.png in grid.out_dir from the runs finished so far; returns REPORT.md."""
    runs = grid.runs()
    outcomes = [o for o in (read_outcome(run, rule) for run in runs) if o is not None]
    curves = plot_curves(outcomes, grid.out_dir / CURVES_FILE) if outcomes else None
    sections = [
        ("What ran", _what_ran(grid, rule, command)),
        ("Summary", "\n\n".join(summarize(grid, outcomes, rule))),
        (
            "Curves",
            f"![loss and gradient norm of every run]({curves.name})"
            if curves
            else "No figure: " + ("no run has finished yet." if not outcomes else "matplotlib is not installed."),
        ),
        (
            "Per setting (mean ± standard deviation over seeds; diverged runs left out of the losses)",
            setting_table(grid, outcomes),
        ),
        ("Per run", run_table(grid, outcomes)),
    ]
    return write_report(grid.out_dir / REPORT_FILE, "Stability ablation", sections)


def _what_ran(grid: Grid, rule: SpikeRule, command: str | None) -> str:
    base, model = grid.base, grid.base.model_config()
    switched = {SWITCHES[axis].field for axis in grid.axes}

    def fixed(field: str, value) -> str:
        return "per switch" if field in switched else str(value)

    switches = "\n".join(
        f"- `{axis}` ({SWITCHES[axis].field}: {SWITCHES[axis].meaning}): {', '.join(values)}"
        for axis, values in grid.axes.items()
    )
    backend = "reference" if "softmax" in grid.axes else model.attention_backend
    ramp = f"ramped from {base.rampup_start_batch_size}" if base.rampup_start_batch_size else "no ramp-up"
    return f"""
{f"Command: `{command}`" if command else ""}

{len(grid.settings())} settings x {grid.seeds} seed(s) = {len(grid.runs())} runs, each the base run with one value per switch:

{switches}

The base run, the same for every run but the switches:

- model: {base.model_preset} shape, {model.num_layers} layers, hidden {model.hidden_size}, vocabulary {model.vocab_size}
- layer norms {fixed("model.layernorm_order", model.layernorm_order)}, attention softmax \
{fixed("model.attention_softmax", model.attention_softmax)} ({backend} attention), dropout {model.hidden_dropout:g}
- data: {base.train_samples} samples of {base.sequence_length} tokens, global batch {base.global_batch_size} ({ramp}); \
every run sees the same batches in the same order (data seed {base.sampler_seed})
- optimiser: lr {base.lr:g} -> {base.min_lr:g}, warmup over {base.warmup_samples} samples, gradient clip {base.grad_clip:g}
- precision {fixed("precision", base.precision)}, embedding gradient scale \
{fixed("embedding_grad_scale", base.embedding_grad_scale)}
- seed i initialises every setting with the same weights (seed {base.seed} + i); spike guard \
{"on" if base.spike_guard.enabled else "off"}

Spike event: a loss above {rule.factor:g} x the median of the last {rule.window} healthy losses (tested from step
{rule.min_history} on), until it is back under that line; a gradient-norm spike, the same with {rule.grad_factor:g} x
on the gradient norm before clipping. Diverged: a non-finite loss, a loss still above the line
at the end after {rule.window} steps or more, or a run the spike guard gave up on. Run folders: `{grid.out_dir / RUNS_DIR}`.
"""


def setting_table(grid: Grid, outcomes: list[RunOutcome]) -> str:
    header = [
        *grid.axes,
        "seeds done",
        "final validation loss",
        "final train loss",
        "spike events",
        "grad-norm spikes",
        "loss-scale skips",
        "guard rollbacks",
        "diverged",
    ]
    rows = []
    for stats in by_setting(grid, outcomes):
        done = stats.outcomes
        healthy = [o for o in done if not o.divergence]
        rows.append(
            [
                *stats.setting.values(),
                f"{len(done)}/{grid.seeds}",
                mean_spread([o.valid_loss for o in healthy if o.valid_loss is not None]),
                mean_spread([o.final_train_loss for o in healthy]),
                mean_range([len(o.verdict.events) for o in done]),
                mean_range([len(o.grad_spikes) for o in done]),
                mean_range([o.loss_scale_skips for o in done]),
                mean_range([o.interventions for o in done]),
                f"{len(stats.diverged)}/{len(done)}",
            ]
        )
    return markdown_table(header, rows)


def run_table(grid: Grid, outcomes: list[RunOutcome]) -> str:
    finished = {o.run.name: o for o in outcomes}
    rows = []
    for run in grid.runs():
        o = finished.get(run.name)
        if o is None:
            rows.append([run.name, run.config.seed, "not run yet", "", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                run.name,
                run.config.seed,
                o.result["steps"],
                _number(o.valid_loss),
                _number(o.final_train_loss),
                len(o.verdict.events),
                len(o.grad_spikes),
                o.loss_scale_skips,
                o.interventions,
                o.divergence or "no",
            ]
        )
    return markdown_table(
        [
            "run",
            "seed",
            "steps",
            "final validation loss",
            "final train loss",
            "spike events",
            "grad-norm spikes",
            "loss-scale skips",
            "guard rollbacks",
            "diverged",
        ],
        rows,
    )


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}" if math.isfinite(value) else str(value)


def plot_curves(outcomes: list[RunOutcome], png_path: Path) -> Path | None:
    """Loss (top) and gradient norm (bottom, log scale) per step of every run; one colour per
    setting, shared by its seeds; x where a run diverged."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    settings = list(dict.fromkeys(label(o.run.setting) for o in outcomes))
    if len(settings) <= 20:  # distinct qualitative colours; beyond 20, a continuous map
        palette = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
        colour = {s: palette(i) for i, s in enumerate(settings)}
    else:
        colour = {s: plt.get_cmap("turbo")(i / (len(settings) - 1)) for i, s in enumerate(settings)}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), dpi=110, sharex=True)
    labelled = set()
    for o in outcomes:
        name = label(o.run.setting)
        top.plot(o.steps, o.losses, lw=0.7, alpha=0.8, color=colour[name], label=None if name in labelled else name)
        labelled.add(name)
        bottom.plot(o.steps, o.grad_norms, lw=0.5, alpha=0.7, color=colour[name])
        finite = [(s, v) for s, v in zip(o.steps, o.losses) if math.isfinite(v)]
        if o.divergence and finite:
            top.plot(*finite[-1], marker="x", ms=8, color=colour[name])
    top.set_ylabel("training loss (nats per target token)")
    bottom.set_ylabel("gradient norm (before clipping)")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(figure, png_path)
