"""TrainConfig: every setting of a pretraining run, from YAML with command-line overrides.

Defaults are the GLM-130B recipe (SPEC.md section 10) wherever the recipe names a value; the
shape of the model comes from a preset (`model_preset`) plus field overrides (`model`). The run
length is counted in samples, as the recipe counts warmup, decay and batch ramp-up.

The command line maps onto the same fields: `--lr 1e-4`, `--spike_guard.window 20`,
`--model.hidden_dropout 0.0`. Values are parsed as YAML scalars, so `--rampup_start_batch_size null`
works.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glm130b.core.config_io import DictConfig, check_field, check_positive_int, field_descriptions, read_mapping
from glm130b.core.errors import ConfigError
from glm130b.distributed.parallelize import ParallelConfig
from glm130b.model.config import PRESETS, GLMConfig
from glm130b.objective.samples import ObjectiveConfig
from glm130b.train.spike_guard import SpikeGuardConfig

PRECISIONS = ("fp32", "bf16", "fp16")
METRICS_FORMATS = ("jsonl", "csv")
# The old top-level spelling of parallel.activation_checkpointing, still read (with a warning).
DEPRECATED_ACTIVATION_CHECKPOINTING = "activation_checkpointing"


@dataclass
class TrainConfig(DictConfig):
    config_label = "TrainConfig"

    # ---------------------------------------------------------------- model
    model_preset: str = "glm-130b"  # the model shape to start from (glm130b.model.config.PRESETS)
    # GLMConfig fields that replace the preset's (e.g. vocab_size from the tokenizer, dropout).
    # attention_backend defaults to auto here (the fastest correct kernel: docs/attention.md).
    # Recomputation in the backward is parallel.activation_checkpointing (below).
    model: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- data
    corpus: str = ""  # a prepared TokenCorpus directory (glm130b.data)
    valid_corpus: str = ""  # its validation counterpart; empty = no validation
    tokenizer: str = ""  # the tokenizer directory the corpora were encoded with
    # Instruction pairs (JSON lines, glm130b.objective.load_mip_pairs) for the recipe's 5 % MIP
    # share; empty = the self-supervised mix only.
    mip_data: str = ""
    sequence_length: int = 2048  # tokens per training sequence
    # ObjectiveConfig fields (glm130b.objective.samples) that replace the recipe's sample mix, itself
    # scaled to sequence_length: e.g. suffix_fraction_min. Validation scores the recipe's [gMASK]
    # suffixes whatever is set here, so that runs with different mixes are measured alike.
    objective: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- run length and batch
    train_samples: int = 4224 * 49_300  # sequences to train on (GLM-130B: ~400 B tokens in 49,300 steps, SPEC 10)
    micro_batch_size: int = 1  # sequences per forward; global batch = an accumulation of these
    global_batch_size: int = 4224  # sequences per optimiser step, over every device and accumulation
    # Batch ramp-up: start at this many sequences and grow linearly to global_batch_size over
    # rampup_fraction of train_samples (GLM-130B: 192 -> 4224 over 2.5 %). None = no ramp-up.
    rampup_start_batch_size: int | None = 192
    rampup_fraction: float = 0.025  # the share of train_samples the ramp-up lasts

    # ---------------------------------------------------------------- optimiser and schedule
    lr: float = 8e-5  # peak learning rate, reached after warmup
    min_lr: float = 8e-6  # the cosine floor
    warmup_fraction: float = 0.005  # linear warmup over 0.5 % of train_samples
    decay_fraction: float = 0.9  # cosine from lr to min_lr ends at 90 % of train_samples
    weight_decay: float = 0.1  # none on biases and LayerNorms
    adam_beta1: float = 0.9  # AdamW's first-moment decay
    adam_beta2: float = 0.95  # AdamW's second-moment decay (the recipe's 0.95, not 0.999)
    adam_eps: float = 1e-8  # AdamW's denominator floor
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping

    # ---------------------------------------------------------------- numerics and stability
    precision: str = "fp16"  # fp32 | bf16 (autocast) | fp16 (autocast, fp32 masters, loss scale)
    # Dynamic loss scale of the recipe (fp16 only): start 2^16, double after 2000 clean steps,
    # halve after `hysteresis` overflows, never below 1.
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 2000  # clean steps before the scale doubles
    loss_scale_hysteresis: int = 2  # overflows before the scale halves
    min_loss_scale: float = 1.0  # the scale never goes below this
    # Embedding gradient shrink: the share of their gradient that the embedding lookup and the tied
    # head pass (0.1 in the recipe; 1 = off). With ramp steps > 0 it grows as
    # scale + (1 - scale) * (step - start) / steps, reaching 1, the schedule the team used.
    embedding_grad_scale: float = 0.1
    embedding_grad_scale_ramp_start: int = 0  # the step the ramp to 1 starts
    embedding_grad_scale_ramp_steps: int = 0  # steps the ramp takes; 0 = the scale stays put
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)

    # ---------------------------------------------------------------- hardware
    device: str = "auto"  # auto = cuda when available, else cpu
    # Peak FLOP/s of one device for MFU. None = look the device up (A100, H100, H200); MFU is
    # printed only when known.
    peak_flops: float | None = None
    seed: int = 1234  # the init, dropout and, unless data_seed is set, the data order
    # The seed of the training and validation samplers; null = seed. Runs that share it see the
    # same batches in the same order whatever their seed (glm130b ablate varies only the init).
    data_seed: int | None = None
    # Degrees of parallelism under torchrun (tp, pp, dp, ...; glm130b.distributed.parallelize). A
    # plain one-process launch reads only parallel.activation_checkpointing from it.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # ---------------------------------------------------------------- output
    out_dir: str = "runs/pretrain"  # the run folder: checkpoints, metrics, settings, the exported model
    log_every: int = 10  # steps between console lines (every step goes to the metrics file)
    metrics_format: str = "jsonl"  # the per-step metrics file: jsonl or csv
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    eval_every: int = 1000  # steps between validation passes (and one at the end)
    eval_batches: int = 8  # micro-batches per validation source
    checkpoint_every: int = 1000  # steps between checkpoints (the spike guard rolls back to the last)
    keep_checkpoints: int = 3  # the newest this many are kept, older ones deleted
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    # Seconds of training (over every launch) after which the run stops: checkpoint, validation,
    # export. Past the warmup (which counts samples), the learning-rate schedule follows the share of
    # this time spent where it is further along than the share of train_samples, so a run cut short
    # still decays in full. null = no limit.
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            # PyYAML reads 1e-4 (no dot) as a string; take such numbers as numbers.
            value = getattr(self, f.name)
            if f.type.startswith("float") and isinstance(value, str):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    pass  # validate() names the field
        if isinstance(self.spike_guard, dict):
            self.spike_guard = SpikeGuardConfig.from_dict(self.spike_guard)
        if isinstance(self.parallel, dict):
            self.parallel = ParallelConfig.from_dict(self.parallel)
        self.validate()

    # ------------------------------------------------------------------ derived values
    def model_config(self, **overrides: Any) -> GLMConfig:
        return GLMConfig.from_preset(self.model_preset, **{"attention_backend": "auto", **self.model, **overrides})

    def objective_config(self) -> ObjectiveConfig:
        """The recipe's sample mix scaled to sequence_length, with the fields of `objective` in place."""
        check_field("objective", self.objective, dict, expected="a mapping of ObjectiveConfig fields")
        derived = [name for name in self.objective if f"objective.{name}" in DERIVED]
        if derived:
            raise ConfigError(
                f"objective.{derived[0]} cannot be set: the sample mix is scaled to the run's "
                "sequence_length; set that instead"
            )
        scaled = ObjectiveConfig.for_sequence_length(self.sequence_length)
        return ObjectiveConfig.from_dict({**scaled.to_dict(), **self.objective})

    @property
    def sampler_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def warmup_samples(self) -> int:
        return int(self.warmup_fraction * self.train_samples)

    @property
    def decay_samples(self) -> int:
        return int(self.decay_fraction * self.train_samples)

    @property
    def rampup_samples(self) -> int:
        return int(self.rampup_fraction * self.train_samples) if self.rampup_start_batch_size else 0

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.model_preset not in PRESETS:
            raise ConfigError(f"model_preset {self.model_preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        self.model_config()  # raises ConfigError naming a bad model field
        if self.objective:  # a bad objective field (fine-tunes, which pack their own sequences, set none)
            self.objective_config()
        for name in (
            "sequence_length",
            "train_samples",
            "micro_batch_size",
            "global_batch_size",
            "loss_scale_window",
            "loss_scale_hysteresis",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "adam_eps", "initial_loss_scale", "min_loss_scale"):
            check_field(name, getattr(self, name), float, lambda v: v > 0, "a positive number")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            check_field(name, getattr(self, name), float, lambda v: v >= 0, "a number >= 0")
        for name in ("warmup_fraction", "decay_fraction", "rampup_fraction"):
            check_field(name, getattr(self, name), float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            check_field(name, getattr(self, name), float, lambda v: 0 <= v < 1, "in [0, 1)")
        check_field("embedding_grad_scale", self.embedding_grad_scale, float, lambda v: 0 < v <= 1, "in (0, 1]")
        for name in ("embedding_grad_scale_ramp_start", "embedding_grad_scale_ramp_steps", "seed"):
            check_field(name, getattr(self, name), int, lambda v: v >= 0, "an integer >= 0")
        if self.data_seed is not None:
            check_field("data_seed", self.data_seed, int, lambda v: v >= 0, "an integer >= 0 or null")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr {self.min_lr} is above lr {self.lr}; the cosine decays from lr down to min_lr")
        if self.warmup_fraction > self.decay_fraction:
            raise ConfigError(
                f"warmup_fraction {self.warmup_fraction} exceeds decay_fraction {self.decay_fraction}: "
                "the cosine decay must end after the warmup"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}; the global batch is an accumulation of whole micro-batches"
            )
        if self.rampup_start_batch_size is not None:
            check_field(
                "rampup_start_batch_size",
                self.rampup_start_batch_size,
                int,
                lambda v: self.micro_batch_size <= v <= self.global_batch_size,
                f"between micro_batch_size ({self.micro_batch_size}) and global_batch_size "
                f"({self.global_batch_size}), or null for no ramp-up",
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.metrics_format not in METRICS_FORMATS:
            raise ConfigError(
                f"metrics_format must be one of {', '.join(METRICS_FORMATS)}; got {self.metrics_format!r}"
            )
        if self.peak_flops is not None:
            check_field("peak_flops", self.peak_flops, float, lambda v: v > 0, "a positive FLOP/s figure or null")
        if self.time_limit_s is not None:
            check_field("time_limit_s", self.time_limit_s, float, lambda v: v > 0, "positive seconds or null")
        if self.sequence_length > self.model_config().max_sequence_length:
            raise ConfigError(
                f"sequence_length {self.sequence_length} exceeds the model's max_sequence_length "
                f"{self.model_config().max_sequence_length}; shorten it or set model.max_sequence_length"
            )
        self.spike_guard.validate()

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """DictConfig.from_dict, reading the old top-level `activation_checkpointing` (with a
        deprecation warning) as parallel.activation_checkpointing."""
        if DEPRECATED_ACTIVATION_CHECKPOINTING in data:
            data = dict(data)
            value = data.pop(DEPRECATED_ACTIVATION_CHECKPOINTING)
            # FutureWarning, not DeprecationWarning: Python shows it to the person running the command.
            warnings.warn(
                "the TrainConfig field activation_checkpointing is deprecated; it now sets "
                "parallel.activation_checkpointing, write that instead",
                FutureWarning,
                stacklevel=2,
            )
            parallel = data.get("parallel") or {}
            if isinstance(parallel, ParallelConfig):
                parallel = parallel.to_dict()
            check_field("parallel", parallel, dict, expected="a mapping of fields")
            set_there = parallel.get(DEPRECATED_ACTIVATION_CHECKPOINTING)
            if set_there is not None and set_there != value:
                raise ConfigError(
                    f"activation_checkpointing {value!r} contradicts parallel.activation_checkpointing "
                    f"{set_there!r}; keep only parallel.activation_checkpointing"
                )
            data["parallel"] = {**parallel, DEPRECATED_ACTIVATION_CHECKPOINTING: value}
        return super().from_dict(data)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML or JSON file, then apply `key=value` overrides (dotted keys reach nested fields)."""
        return cls.from_dict(apply_overrides(read_mapping(path, cls.config_label), overrides or []))


# What a resumed run may change: how often it logs, validates and saves, what it validates on,
# where it runs and is kept, and its layout over devices (`parallel.*`: checkpoints reshard). Every
# other field decides the run's numbers (its model, data, schedule, seed).
RESUMABLE_SECTIONS = ("parallel.",)
RESUMABLE_CHANGES = frozenset(
    {
        "out_dir",
        "log_every",
        "eval_every",
        "eval_batches",
        "valid_corpus",
        "checkpoint_every",
        "keep_checkpoints",
        "tensorboard",
        "resume",
        "peak_flops",
        "device",
        "time_limit_s",
    }
)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: TrainConfig, new: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume the run in `run_dir` (its settings `saved`) with settings `new` that differ
    in a field outside RESUMABLE_CHANGES (the model compared as built: preset plus overrides)."""
    before, after = (_flat({**c.to_dict(), "model": c.model_config().to_dict()}) for c in (saved, new))
    changed = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    changed = [key for key in changed if key not in RESUMABLE_CHANGES and not key.startswith(RESUMABLE_SECTIONS)]
    if changed:
        shown = ", ".join(f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in changed[:3])
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({shown}{', ...' if len(changed) > 3 else ''}); a resumed "
            f"run keeps them (only {', '.join(sorted(RESUMABLE_CHANGES))} and parallel.* may change). Start a new run with "
            "--out_dir NEW_DIR, discard this one with --restart, or give the run's own values again"
        )


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "model.hidden_dropout=0"]` applied onto a nested mapping (values as YAML scalars)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value")
        value = yaml.safe_load(text)
        section, dot, leaf = key.partition(".")
        if dot:
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{section} is not a section, so {key} cannot be set")
            data[section][leaf] = value
        else:
            data[key] = value
    return data


# The TrainConfig fields that are sections of their own, set on the command line as --section.field.
SECTIONS: dict[str, type] = {
    "spike_guard": SpikeGuardConfig,
    "parallel": ParallelConfig,
    "model": GLMConfig,
    "objective": ObjectiveConfig,
}


# Section fields that follow from another setting and cannot be set themselves.
DERIVED = frozenset({"objective.sequence_length"})


@functools.cache
def _scaled_objective_fields() -> frozenset[str]:
    """ObjectiveConfig fields whose recipe value depends on the sequence length."""
    recipe, shorter = ObjectiveConfig(), ObjectiveConfig.for_sequence_length(ObjectiveConfig().sequence_length // 4)
    return frozenset(
        f.name for f in dataclasses.fields(ObjectiveConfig) if getattr(recipe, f.name) != getattr(shorter, f.name)
    )


def option_names(exclude: tuple[str, ...] = ()) -> list[str]:
    """Every TrainConfig setting as a command-line name (`lr`, `spike_guard.window`, `model.ffn`),
    less the fields and sections in `exclude`."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS and f.name not in exclude]
    for section, cls in SECTIONS.items():
        if section not in exclude:
            names += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f"{section}.{f.name}" not in DERIVED]
    return names


@functools.cache
def _descriptions(cls: type) -> dict[str, str]:
    return field_descriptions(cls)


def option_help(name: str, default: str | None = None) -> str:
    """`--name`'s help: the description beside the field in the source and its default (`default`
    when the command has its own; a model field's comes from the preset)."""
    section, _, leaf = name.rpartition(".")
    cls = SECTIONS[section] if section else TrainConfig
    if default is None and section == "model":
        default = "the preset's"
    elif default is None and section == "objective" and leaf in _scaled_objective_fields():
        default = "the recipe's, scaled to sequence_length"
    elif default is None:
        value = next(f.default for f in dataclasses.fields(cls) if f.name == leaf)
        default = repr(value) if isinstance(value, str) else str(value)
    text = f"{_descriptions(cls).get(leaf, leaf.replace('_', ' '))} (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--<field> VALUE` for every TrainConfig field, `--spike_guard.<field>`, `--parallel.<field>`
    and `--model.<field>`, each with its description and default."""
    group = parser.add_argument_group("run settings (override the config file)")
    for name in option_names():
        # SUPPRESS: an option not given is absent, so it cannot override the config file
        group.add_argument(
            f"--{name}", dest=f"override:{name}", metavar="VALUE", default=argparse.SUPPRESS, help=option_help(name)
        )
    group.add_argument(
        f"--{DEPRECATED_ACTIVATION_CHECKPOINTING}",
        dest=f"override:{DEPRECATED_ACTIVATION_CHECKPOINTING}",
        metavar="VALUE",
        default=argparse.SUPPRESS,
        help="deprecated: use --parallel.activation_checkpointing",
    )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    return [
        f"{key.removeprefix('override:')}={value}"
        for key, value in vars(args).items()
        if key.startswith("override:") and value is not None
    ]
