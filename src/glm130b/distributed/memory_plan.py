"""A training recipe (model + parallel layout + training schedule) and its memory per GPU: `glm130b plan`.

`glm130b plan --config configs/glm-130b-recipe.yaml --world-size 768` validates the recipe, builds
the model and every pipeline stage on the meta device (no memory), and prints per GPU, for the
stage that needs most: weights, gradients, optimizer states and activations with recomputation.
It follows what glm130b.distributed.parallelize builds (FSDP2 over dp, the TP plan, 1F1B over pp);
what each term counts, and what the estimate leaves out: docs/distributed.md, `glm130b plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glm130b.adapters.folder import METHODS as ADAPTER_METHODS
from glm130b.adapters.lora import LORA_TARGETS
from glm130b.core.config_io import DictConfig, check_field, check_positive_int, read_mapping
from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import ConfigError
from glm130b.distributed.inference_plan import dequantize_workspace_bytes, linear_shapes, weight_bytes
from glm130b.distributed.parallelize import ParallelConfig, split_geglu
from glm130b.distributed.pipeline import pipeline_stage, stage_layer_ranges
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM

GIB = 2**30
# Parameter names that the TP plan shards over tp ranks (weights and the column-parallel biases).
TP_SHARDED = ("attention.query_key_value.", "attention.dense.weight", "mlp.dense_h_to_4h.", "mlp.dense_4h_to_h.weight")


@dataclass
class TrainingSchedule:
    """The recipe's batch and optimizer schedule (SPEC.md section 10); the trainer reads the rest
    of the `training` section itself."""

    global_batch_size: int = 4224  # sequences per optimizer step
    micro_batch_size: int = 1  # sequences per microbatch on one data-parallel rank
    sequence_length: int = 2048
    extra: dict[str, Any] = field(default_factory=dict)  # lr schedule, ramp-up, etc., passed through

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "micro_batch_size", "sequence_length"):
            check_positive_int(f"training.{name}", getattr(self, name))


@dataclass
class FinetunePlan(DictConfig):
    """A recipe's optional `finetune` section (glm130b.finetune): an adapter over a frozen base,
    quantized or not, instead of training every weight."""

    config_label = "finetune"

    method: str = "lora"  # lora | ptuning (full fine-tuning is the plain recipe)
    bits: int | None = None  # the frozen base's linears in 4 or 8 bits; null = param_dtype
    group_size: int | None = None  # quantization scales per group of input columns; null = per row
    lora_rank: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["query_key_value"])
    prefix_length: int = 128

    def __post_init__(self) -> None:
        check_field(
            "finetune.method",
            self.method,
            str,
            lambda v: v in ADAPTER_METHODS,
            f"one of {', '.join(ADAPTER_METHODS)} (full fine-tuning is the recipe without this section)",
        )
        if self.bits not in (None, 4, 8):
            raise ConfigError(f"finetune.bits must be 4, 8 or null, got {self.bits!r}")
        check_positive_int("finetune.lora_rank", self.lora_rank)
        check_positive_int("finetune.prefix_length", self.prefix_length)
        check_field(
            "finetune.lora_targets",
            self.lora_targets,
            list,
            lambda v: v and set(v) <= set(LORA_TARGETS),
            f"a non-empty list of {', '.join(LORA_TARGETS)}",
        )

    def trainable_parameters(self, config: GLMConfig) -> int:
        """LoRA: rank x (in + out) per adapted linear; P-tuning v2: a key and a value per layer."""
        if self.method == "ptuning":
            return config.num_layers * 2 * self.prefix_length * config.hidden_size
        shapes = linear_shapes(config)
        return config.num_layers * sum(self.lora_rank * (shapes[t][0] + shapes[t][1]) for t in self.lora_targets)

    def describe(self, config: GLMConfig, param_dtype: str) -> str:
        what = (
            f"LoRA rank {self.lora_rank} on {', '.join(self.lora_targets)}"
            if self.method == "lora"
            else f"P-tuning v2, {self.prefix_length} virtual tokens per layer"
        )
        base = f"INT{self.bits}" if self.bits else param_dtype
        return f"fine-tuning: {what} over a frozen {base} base, {self.trainable_parameters(config) / 1e6:.1f} M trained parameters"


@dataclass
class Recipe:
    model: GLMConfig
    parallel: ParallelConfig
    training: TrainingSchedule
    finetune: FinetunePlan | None = None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        data = read_mapping(path, "recipe")
        if "model" not in data:
            raise ConfigError(f"{path} must be a mapping with `model`, `parallel` and `training` sections")
        for section in ("model", "parallel", "training"):
            check_field(f"{section} (in {path})", data.get(section) or {}, dict, expected="a mapping of fields")
        model = dict(data["model"])
        preset = model.pop("preset", None)
        config = GLMConfig.from_preset(preset, **model) if preset else GLMConfig.from_dict(model)
        parallel = ParallelConfig.from_dict(dict(data.get("parallel") or {}))
        training = dict(data.get("training") or {})
        known = {f.name for f in dataclasses.fields(TrainingSchedule)} - {"extra"}
        schedule = TrainingSchedule(
            **{k: v for k, v in training.items() if k in known},
            extra={k: v for k, v in training.items() if k not in known},
        )
        finetune = data.get("finetune")
        if finetune is not None:
            check_field(f"finetune (in {path})", finetune, dict, expected="a mapping of fields")
            finetune = FinetunePlan.from_dict(finetune)
        return cls(config, parallel, schedule, finetune)

    def resolve(self, world_size: int) -> Recipe:
        """Validate against `world_size`: dp filled in, pipeline microbatches from the batch."""
        pcfg = self.parallel.resolve(world_size)
        per_rank = pcfg.dp * self.training.micro_batch_size
        if self.training.global_batch_size % per_rank:
            raise ConfigError(
                f"global_batch_size {self.training.global_batch_size} is not a multiple of "
                f"dp {pcfg.dp} x micro_batch_size {self.training.micro_batch_size} = {per_rank}; "
                "change the batch or the world size"
            )
        if self.training.sequence_length > self.model.max_sequence_length:
            raise ConfigError(
                f"sequence_length {self.training.sequence_length} exceeds the model's "
                f"max_sequence_length {self.model.max_sequence_length}"
            )
        pcfg = pcfg.with_microbatches(self.training.global_batch_size, self.training.micro_batch_size)
        pcfg = pcfg.validate(self.model, world_size)
        return dataclasses.replace(self, parallel=pcfg)


@dataclass
class StageMemory:
    stage: int
    layers: tuple[int, int]
    params: int  # parameters held by one GPU of this stage (after TP, before FSDP)
    weights: float  # bytes: gathered compute weights + sharded fp32 master
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def stage_parameter_counts(config: GLMConfig, pp: int, tp: int) -> list[tuple[tuple[int, int], int]]:
    """Build the model and each pipeline stage on the meta device; count what one GPU of each holds."""

    counts = []
    ranges = stage_layer_ranges(config.num_layers, pp)
    for s, (start, end) in enumerate(ranges):
        with torch.device("meta"):  # a model per stage: pipeline_stage turns it into the stage in place
            stage = pipeline_stage(split_geglu(GLM(config)), start, end, s == 0, s == pp - 1)
        n = 0
        for name, p in stage.named_parameters():
            n += p.numel() // tp if any(key in name for key in TP_SHARDED) else p.numel()
        counts.append(((start, end), n))
    return counts


def layer_activation_bytes_per_token(config: GLMConfig, tp: int, act_bytes: int) -> float:
    """Saved tensors of one layer's forward (flash attention: no [S, S] scores kept), per token."""
    h, f = config.hidden_size, config.inner_hidden_size
    branches = 2 if config.ffn == "geglu" else 1
    replicated = 4 * h * act_bytes + 2 * h  # both LayerNorm inputs and outputs; two 1-byte dropout masks
    sharded = (3 * h + h + h) * act_bytes  # q, k, v after rotary; attention output; its lse-sized extras ~ h
    sharded += (branches * f + 2 * f) * act_bytes  # h_to_4h output, gelu(gate), the product into 4h_to_h
    return replicated + sharded / tp


def estimate(recipe: Recipe) -> list[StageMemory]:
    """Memory per GPU of every pipeline stage for a resolved recipe."""
    if recipe.finetune is not None:
        return [adapter_memory(recipe)]
    cfg, pcfg, tr = recipe.model, recipe.parallel, recipe.training
    p_bytes = DTYPES[pcfg.param_dtype].itemsize
    r_bytes = DTYPES[pcfg.reduce_dtype].itemsize
    tokens = tr.micro_batch_size * tr.sequence_length
    layer_act = layer_activation_bytes_per_token(cfg, pcfg.tp, p_bytes) * tokens
    out = []
    for s, ((start, end), n) in enumerate(stage_parameter_counts(cfg, pcfg.pp, pcfg.tp)):
        layers = end - start
        sharded = n / pcfg.dp
        # FSDP2 keeps the gathered copy when reshard_after_forward is False (or when dp = 1);
        # otherwise about two blocks (the current and the prefetched one) plus the root.
        fsdp = pcfg.dp > 1 or pcfg.tp > 1  # what parallelize applies
        if pcfg.reshard_after_forward and pcfg.dp > 1:
            per_layer = (n - _non_layer_params(cfg, s, pcfg.pp)) / max(layers, 1)
            gathered = (2 * per_layer + _non_layer_params(cfg, s, pcfg.pp)) * p_bytes
        else:
            gathered = n * p_bytes
        # without FSDP2 the fp32 parameters themselves are the only copy
        weights = gathered + sharded * 4 if fsdp else n * 4
        grads = n * r_bytes + (sharded * 4 if fsdp else 0)
        optimizer = sharded * 8
        in_flight = min(pcfg.pp - s, pcfg.microbatches) if pcfg.pp > 1 else 1
        if pcfg.activation_checkpointing:
            acts = in_flight * layers * tokens * cfg.hidden_size * p_bytes + layer_act
        else:
            acts = in_flight * layers * layer_act
        if s == pcfg.pp - 1:  # logits in param dtype, their fp32 copy for the loss, its gradient
            acts += tokens * cfg.vocab_size * (p_bytes + 4 + 4)
        out.append(StageMemory(s, (start, end), n, weights, grads, optimizer, acts))
    return out


def adapter_memory(recipe: Recipe) -> StageMemory:
    """One GPU of an adapter fine-tune (glm130b.finetune runs those data parallel, tp = pp = 1):
    the whole frozen base in param_dtype, its linears packed when quantized (the estimate does not
    count FSDP2 sharding a floating-point base over dp); fp32 adapters with fp32 gradients and AdamW
    states; the activations of a full training step, since the backward passes through every
    frozen layer; and the dequantized weight tile the quantized products work in."""
    cfg, pcfg, tr, ft = recipe.model, recipe.parallel, recipe.training, recipe.finetune
    if pcfg.tp > 1 or pcfg.pp > 1:
        raise ConfigError("an adapter fine-tune runs data parallel only: set parallel.tp and parallel.pp to 1")
    p_bytes = DTYPES[pcfg.param_dtype].itemsize
    tokens = tr.micro_batch_size * tr.sequence_length
    trainable = ft.trainable_parameters(cfg)
    base = weight_bytes(cfg, 1, ft.bits, ft.group_size, p_bytes)
    layer_act = layer_activation_bytes_per_token(cfg, 1, p_bytes) * tokens
    if pcfg.activation_checkpointing:
        acts = cfg.num_layers * tokens * cfg.hidden_size * p_bytes + layer_act
    else:
        acts = cfg.num_layers * layer_act
    acts += tokens * cfg.vocab_size * (p_bytes + 4 + 4)  # logits, their fp32 copy, its gradient
    acts += dequantize_workspace_bytes(cfg, 1, ft.bits, tr.micro_batch_size, tr.sequence_length, p_bytes)
    params = sum(p.numel() for p in _meta_model(cfg).parameters()) + trainable
    return StageMemory(0, (0, cfg.num_layers), params, base + trainable * 4, trainable * 4.0, trainable * 8.0, acts)


def _non_layer_params(cfg: GLMConfig, stage: int, pp: int) -> int:
    n = 0
    if stage == 0 or (stage == pp - 1 and cfg.tie_word_embeddings):
        n += cfg.vocab_size * cfg.hidden_size
    if stage == pp - 1:
        n += 2 * cfg.hidden_size + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return n


def format_plan(recipe: Recipe, world_size: int, stages: list[StageMemory], gpu_gib: float | None) -> str:
    cfg, pcfg, tr = recipe.model, recipe.parallel, recipe.training
    total_params = sum(p.numel() for p in _meta_model(cfg).parameters())
    sharding = (
        f"FSDP2 over dp ({'ZeRO-3' if pcfg.reshard_after_forward else 'ZeRO-2'}), {pcfg.pp_schedule} with "
        f"{pcfg.microbatches} microbatches"
        if recipe.finetune is None
        else "the frozen base whole on every GPU"
    )
    lines = [
        f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {total_params / 1e9:.2f} B parameters",
        f"layout: world {world_size} = tp {pcfg.tp} x pp {pcfg.pp} x dp {pcfg.dp}; {sharding}; recompute every "
        f"layer: {pcfg.activation_checkpointing}; compute {pcfg.param_dtype}, grads reduced in {pcfg.reduce_dtype}",
        f"batch: {tr.global_batch_size} x {tr.sequence_length} tokens per step, micro batch {tr.micro_batch_size}",
        *([recipe.finetune.describe(cfg, pcfg.param_dtype)] if recipe.finetune is not None else []),
        "",
        f"{'stage':>5} {'layers':>9} {'params/GPU':>11} {'weights':>9} {'grads':>9} {'optim':>9} {'activ.':>9} {'total':>9}  (GiB)",
    ]
    for m in stages:
        lines.append(
            f"{m.stage:>5} {f'{m.layers[0]}-{m.layers[1] - 1}':>9} {m.params / 1e9:>10.2f}B "
            f"{m.weights / GIB:>9.1f} {m.grads / GIB:>9.1f} {m.optimizer / GIB:>9.1f} "
            f"{m.activations / GIB:>9.1f} {m.total / GIB:>9.1f}"
        )
    worst = max(stages, key=lambda m: m.total)
    lines.append(
        f"peak per GPU: {worst.total / GIB:.1f} GiB (stage {worst.stage}); an estimate without "
        "allocator fragmentation or communication buffers"
    )
    if gpu_gib is not None:
        verdict = "fits" if worst.total <= 0.9 * gpu_gib * GIB else "does NOT fit"
        lines.append(f"{verdict} in {gpu_gib:g} GiB per GPU (keeping 10 % free)")
    return "\n".join(lines)


def _meta_model(cfg: GLMConfig):
    with torch.device("meta"):
        return GLM(cfg)
