"""Memory per device of inference (`glm130b plan --gpus 8x40GB --bits 4`): weights, KV cache, activations,
workspace and runtime, for a model split tensor-parallel over the GPUs (how GLM-130B serves), and
whether it fits. The terms follow what glm130b.generate allocates (docs/distributed.md, "Inference
memory"); checked against the official hardware table and against measured peaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glm130b.core.config_io import check_positive_int
from glm130b.core.errors import ConfigError
from glm130b.model.config import GLMConfig

GIB = 2**30
GPUS_SPEC = re.compile(r"(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*(GB|GiB|G)?", re.IGNORECASE)
# Allocator fragmentation and what the plan does not itemise: keep this share of each GPU free.
HEADROOM = 0.05
# CUDA context, cuBLAS/NCCL workspaces and the framework's own allocations per GPU (measured ~0.4-0.6
# GiB on recent cards); zero for a CPU run, whose baseline the caller measures apart.
CUDA_RUNTIME_BYTES = 0.5 * GIB
KV_CACHE_LENGTH_MULTIPLE = 64  # glm130b.generate rounds the cache length up to this
LINEAR_ROLES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class Devices:
    count: int
    memory_bytes: float

    @classmethod
    def parse(cls, text: str) -> Devices:
        """'8x40GB', '4 x 24GiB', '80GB' (one device). Card labels are binary sizes: 40GB = 40 GiB."""
        match = GPUS_SPEC.fullmatch(text.strip())
        if not match or float(match.group(2)) <= 0 or (match.group(1) and int(match.group(1)) < 1):
            raise ConfigError(f"--gpus {text!r} is not COUNTxMEMORY, e.g. 8x40GB or 4x24GB")
        return cls(int(match.group(1) or 1), float(match.group(2)) * GIB)


@dataclass(frozen=True)
class InferenceMemory:
    weights: float
    kv_cache: float
    activations: float
    workspace: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.workspace + self.runtime


def linear_shapes(config: GLMConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of the four linear layers of one block (TP = 1)."""
    h, f = config.hidden_size, config.inner_hidden_size
    branches = 2 if config.ffn == "geglu" else 1
    return {"query_key_value": (3 * h, h), "dense": (h, h), "dense_h_to_4h": (branches * f, h), "dense_4h_to_h": (h, f)}


def weight_bytes(config: GLMConfig, tp: int, bits: int | None, group_size: int | None, dtype_bytes: int) -> float:
    """One GPU's weights: the linears split over tp (packed ints + fp16 scales when quantized, the
    column-split ones keeping a scale per output row on every rank), the vocabulary-split embedding,
    replicated LayerNorms and biases, and an untied head split like the embedding."""
    per_layer = 0.0
    for role, (out, inp) in linear_shapes(config).items():
        rows, cols = (out, inp // tp) if role in ("dense", "dense_4h_to_h") else (out // tp, inp)
        if bits is None:
            per_layer += rows * cols * dtype_bytes
        else:
            scales = rows * (cols // group_size if group_size else 1)
            per_layer += rows * cols * bits / 8 + scales * 2
        per_layer += (out // tp if role in ("query_key_value", "dense_h_to_4h") else out) * dtype_bytes  # bias
    per_layer += 4 * config.hidden_size * dtype_bytes  # two LayerNorms
    heads = 1 if config.tie_word_embeddings else 2
    embedding = heads * config.vocab_size * config.hidden_size / tp * dtype_bytes
    return config.num_layers * per_layer + embedding + 2 * config.hidden_size * dtype_bytes


def kv_cache_bytes(config: GLMConfig, tp: int, batch: int, context: int, dtype_bytes: int) -> float:
    """Keys and values of every layer for `context` positions (the cache length rounded up as
    glm130b.generate allocates it, capped at max_sequence_length)."""
    length = min(-(-context // KV_CACHE_LENGTH_MULTIPLE) * KV_CACHE_LENGTH_MULTIPLE, config.max_sequence_length)
    return 2 * config.num_layers * batch * length * config.hidden_size / tp * dtype_bytes


def activation_bytes(config: GLMConfig, tp: int, batch: int, context: int, dtype_bytes: int) -> float:
    """The largest transient of the prefill forward (no gradients kept): the residual stream and a
    layer's inputs, q/k/v, the fp32 attention scores and probabilities of the math attention path,
    the FFN intermediate, and the logits of each row's last prompt token with their fp32 copy."""
    h, f, v = config.hidden_size, config.inner_hidden_size, config.vocab_size
    branches = 2 if config.ffn == "geglu" else 1
    tokens = batch * context
    stream = 3 * tokens * h * dtype_bytes
    attention = tokens * 3 * h / tp * dtype_bytes + 2 * batch * (config.num_attention_heads / tp) * context**2 * 4
    ffn = tokens * (branches + 1) * f / tp * dtype_bytes
    logits = batch * v * (dtype_bytes + 4)  # prefill computes the last prompt token's only; + their fp32 copy
    return stream + max(attention, ffn, logits)


def dequantize_workspace_bytes(
    config: GLMConfig, tp: int, bits: int | None, batch: int, context: int, dtype_bytes: int
) -> float:
    """Quantized prefill dequantizes weight tiles inside the matmul (glm130b.quant.kernels): at most
    one tile of 2^20 elements plus its output block; nothing without quantization."""
    if bits is None:
        return 0.0
    widest = max(out for out, _ in linear_shapes(config).values()) / tp
    return (2**20 + batch * context * widest) * dtype_bytes


def plan_inference(
    config: GLMConfig,
    tp: int,
    bits: int | None = None,
    group_size: int | None = None,
    context: int = 2048,
    batch: int = 1,
    dtype_bytes: int = 2,
    runtime_bytes: float = CUDA_RUNTIME_BYTES,
) -> InferenceMemory:
    """Bytes per device of generating for `batch` sequences of `context` tokens at TP degree `tp`."""
    for name, value in (("tp", tp), ("context", context), ("batch", batch)):
        check_positive_int(name, value)
    if config.num_attention_heads % tp or config.inner_hidden_size % tp:
        raise ConfigError(
            f"{tp} GPUs cannot split {config.num_attention_heads} heads and an FFN of "
            f"{config.inner_hidden_size} evenly; use a GPU count dividing both"
        )
    if context > config.max_sequence_length:
        raise ConfigError(f"context {context} exceeds max_sequence_length {config.max_sequence_length}")
    if bits not in (None, 4, 8):
        raise ConfigError(f"--bits must be 4 or 8 (or left out for {8 * dtype_bytes}-bit weights), got {bits}")
    return InferenceMemory(
        weight_bytes(config, tp, bits, group_size, dtype_bytes),
        kv_cache_bytes(config, tp, batch, context, dtype_bytes),
        activation_bytes(config, tp, batch, context, dtype_bytes),
        dequantize_workspace_bytes(config, tp, bits, batch, context, dtype_bytes),
        runtime_bytes,
    )


def fits(memory: InferenceMemory, devices: Devices) -> bool:
    return memory.total <= (1 - HEADROOM) * devices.memory_bytes


def format_inference_plan(
    config: GLMConfig, devices: Devices, bits: int | None, memory: InferenceMemory, context: int, batch: int
) -> str:
    weights = f"INT{bits}" if bits else "fp16"
    lines = [
        f"inference: {config.num_layers} layers, hidden {config.hidden_size}, {weights} weights, "
        f"tensor parallel over {devices.count} GPU(s) of {devices.memory_bytes / GIB:g} GiB; "
        f"batch {batch} x context {context}",
        f"{'weights':>10} {'KV cache':>10} {'activ.':>10} {'workspace':>10} {'runtime':>10} {'total':>10}  (GiB per GPU)",
        " ".join(
            f"{x / GIB:>10.2f}"
            for x in (
                memory.weights,
                memory.kv_cache,
                memory.activations,
                memory.workspace,
                memory.runtime,
                memory.total,
            )
        ),
    ]
    verdict = "fits" if fits(memory, devices) else "does NOT fit"
    lines.append(
        f"{verdict}: {memory.total / GIB:.1f} GiB of {devices.memory_bytes / GIB:g} GiB per GPU "
        f"(keeping {HEADROOM:.0%} free for fragmentation)"
    )
    return "\n".join(lines)
