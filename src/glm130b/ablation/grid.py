"""The grid of `glm130b ablate`: its switches, the base run they vary, and the TrainConfig of each run.

Every run of a grid is the base config with one value per switch, trained for the same number of
steps on the same batches in the same order (data_seed is the base's for every run); seed number
i initialises every setting with the same weights (seed = base seed + i). The provocation knobs
(a learning-rate multiplier, a shorter warmup) apply to the base, so to every run alike.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from glm130b.core.config_io import check_field, check_positive_int
from glm130b.core.errors import ConfigError
from glm130b.model.config import ATTENTION_SOFTMAX_DTYPES, LAYERNORM_ORDERS
from glm130b.train.config import PRECISIONS, TrainConfig, apply_overrides
from glm130b.train.optim import global_batch_size_at


@dataclass(frozen=True)
class Switch:
    field: str  # the TrainConfig field it sets (dotted: inside `model`)
    choices: tuple[str, ...] | None  # the allowed values; None = a number, checked by TrainConfig
    meaning: str


SWITCHES = {
    "layernorm": Switch("model.layernorm_order", LAYERNORM_ORDERS, "where the LayerNorms sit (deepnorm = GLM-130B)"),
    "softmax": Switch(
        "model.attention_softmax",
        ATTENTION_SOFTMAX_DTYPES,
        "attention softmax in fp32 (GLM-130B) or in the compute dtype",
    ),
    "egs": Switch("embedding_grad_scale", None, "embedding gradient shrink factor (0.1 = GLM-130B, 1 = off)"),
    "precision": Switch("precision", PRECISIONS, "fp16 with loss scaling (GLM-130B), bf16 or fp32"),
}
RUNS_DIR = "runs"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["layernorm=deepnorm,pre", "egs=1.0,0.1"]` -> {"layernorm": ["deepnorm", "pre"], "egs": ["1.0", "0.1"]}."""
    axes: dict[str, list[str]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        values = [v.strip() for v in text.split(",")]
        if not sep or not all(values):
            raise ConfigError(f"grid switch {item!r} must look like name=value,value (e.g. layernorm=deepnorm,pre)")
        if name not in SWITCHES:
            raise ConfigError(f"unknown grid switch {name!r}; choose from {', '.join(SWITCHES)}")
        if name in axes:
            raise ConfigError(f"grid switch {name} is given twice; list all its values once: {name}=a,b")
        if len(set(values)) < len(values):
            raise ConfigError(f"grid switch {name} repeats a value in {text!r}")
        choices = SWITCHES[name].choices
        for value in values:
            if choices is not None and value not in choices:
                raise ConfigError(f"{name}={value} is not a choice; {name} takes {', '.join(choices)}")
            if choices is None:
                try:
                    float(value)
                except ValueError:
                    raise ConfigError(f"{name}={value} is not a number") from None
        axes[name] = values
    if not axes:
        raise ConfigError(
            f"the grid is empty; give at least one switch, e.g. layernorm=deepnorm,pre "
            f"(switches: {', '.join(SWITCHES)})"
        )
    return axes


def provoked(
    config: TrainConfig, steps: int, lr_multiplier: float = 1.0, warmup_multiplier: float = 1.0
) -> TrainConfig:
    """The base run of a grid: `steps` updates long, its lr schedule (peak and floor) times
    lr_multiplier and its warmup times warmup_multiplier (below 1: shorter)."""
    check_positive_int("steps", steps)
    check_field("lr multiplier", lr_multiplier, float, lambda v: v > 0, "a positive number")
    check_field("warmup multiplier", warmup_multiplier, float, lambda v: v > 0, "a positive number")
    config = dataclasses.replace(
        config,
        lr=config.lr * lr_multiplier,
        min_lr=config.min_lr * lr_multiplier,
        warmup_fraction=config.warmup_fraction * warmup_multiplier,
    )
    return dataclasses.replace(config, train_samples=samples_for_steps(config, steps))


def samples_for_steps(config: TrainConfig, steps: int) -> int:
    """The fewest train_samples that give `steps` updates: the batch ramp-up, whose length is a
    fraction of train_samples, makes the early steps smaller than global_batch_size."""

    def updates(total: int) -> int:
        run = dataclasses.replace(config, train_samples=total)
        samples = count = 0
        while samples < total:
            samples += global_batch_size_at(samples, run)
            count += 1
        return count

    low, high = steps - 1, steps * config.global_batch_size  # updates(high) >= steps; every update takes >= 1 sample
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if updates(middle) >= steps else (middle, high)
    return high


@dataclass
class GridRun:
    name: str  # its folder under <out>/runs
    setting: dict[str, str]  # switch -> value
    seed_index: int
    config: TrainConfig


@dataclass
class Grid:
    base: TrainConfig  # provoked() already applied
    axes: dict[str, list[str]]
    seeds: int
    out_dir: Path

    def __post_init__(self) -> None:
        check_positive_int("seeds", self.seeds)
        self.out_dir = Path(self.out_dir)
        self.runs()  # a value that TrainConfig refuses fails here, before anything runs

    def settings(self) -> list[dict[str, str]]:
        return [dict(zip(self.axes, values)) for values in itertools.product(*self.axes.values())]

    def runs(self) -> list[GridRun]:
        """Seed-major: every setting of seed 0 first, so an interrupted grid has whole comparisons."""
        return [self._run(setting, i) for i in range(self.seeds) for setting in self.settings()]

    def _run(self, setting: dict[str, str], seed_index: int) -> GridRun:
        name = "_".join(f"{axis}-{value}" for axis, value in setting.items()) + f"_seed-{seed_index}"
        overrides = [f"{SWITCHES[axis].field}={value}" for axis, value in setting.items()]
        if "softmax" in self.axes:  # one attention arithmetic for every run: only the softmax dtype differs
            overrides.append("model.attention_backend=reference")
        data = apply_overrides(self.base.to_dict(), overrides)
        # resume: a run interrupted part-way continues from its checkpoint (the runner has checked
        # that the folder holds this very run)
        data.update(
            seed=self.base.seed + seed_index,
            data_seed=self.base.sampler_seed,
            out_dir=str(self.out_dir / RUNS_DIR / name),
            resume=True,
        )
        try:
            config = TrainConfig.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"grid run {name}: {err}") from None
        return GridRun(name, setting, seed_index, config)
