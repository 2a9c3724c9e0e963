"""GLMConfig: the shape and switches of a GLM model, named presets, YAML/JSON round trip.

Field names follow the official model arguments (SwissArmyTransformer's GLM130B), so a config
written by the official code reads with no renaming. Leaving every switch at its default
reproduces the official GLM-130B class: 1-D rotary with fp16 tables, GeGLU, tied head,
DeepNorm alpha from num_layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glm130b.core.config_io import DictConfig, check_field, check_positive_int
from glm130b.core.errors import ConfigError

POSITION_ENCODINGS = ("1d", "2d")
ROTARY_DTYPES = ("fp16", "fp32")
FFN_KINDS = ("geglu", "gelu")
ATTENTION_BACKENDS = ("sdpa", "reference", "prefix", "auto")
LAYERNORM_ORDERS = ("deepnorm", "post", "pre", "sandwich")
ATTENTION_SOFTMAX_DTYPES = ("fp32", "half")
PREFIX_KERNELS = ("auto", "varlen", "varlen_packed", "flex", "loop")


# The fields that fix a model's shape (and its weights' sizes): what a checkpoint's config must name.
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "inner_hidden_size",
    "max_sequence_length",
)


@dataclass
class GLMConfig(DictConfig):
    config_label = "GLMConfig"

    num_layers: int  # transformer blocks
    hidden_size: int  # model width
    num_attention_heads: int  # heads per attention layer; hidden_size must divide by it
    vocab_size: int  # rows of the (tied) embedding: the tokenizer's size, padded
    # Width of one FFN branch. GLM-130B: 32768 (= 8/3 x 12288, so GeGLU costs what a 4h FFN does).
    # None means 4 x hidden_size, the official code's default.
    inner_hidden_size: int | None = None
    max_sequence_length: int = 2048  # longest sequence (rotary tables and KV cache are sized by it)
    layernorm_epsilon: float = 1e-5  # added to the variance in every LayerNorm
    # "1d": rotary over the whole head dim by position id (GLM-130B).
    # "2d": two halves rotated by position id and block position id (ChatGLM-6B).
    position_encoding: str = "1d"
    # The official GLM-130B code builds its rotary cos/sin tables in fp16, which rounds large
    # angles; "fp16" reproduces that bit for bit, "fp32" is more accurate (~4e-3 on logits).
    rotary_dtype: str = "fp16"
    # "geglu": value half * erf-GELU(gate half) (GLM-130B); "gelu": one tanh-GELU FFN (ChatGLM-6B).
    ffn: str = "geglu"
    tie_word_embeddings: bool = True  # the output layer reuses the input embedding (GLM-130B)
    # Layer count used for DeepNorm alpha = sqrt(2 N). None = num_layers. ChatGLM-6B's code
    # hard-wires 28 whatever the real depth; its preset keeps that quirk.
    deepnorm_num_layers: int | None = None
    hidden_dropout: float = 0.1  # dropout on each block's branch outputs (training only)
    attention_dropout: float = 0.1  # dropout on the attention probabilities (training only)
    # "sdpa": torch scaled_dot_product_attention with the bool mask (within 1e-5 of the reference
    # in fp32); "reference": the official arithmetic step by step; "prefix": the prefix-LM kernels
    # on the compact mask (no attention dropout); "auto": prefix unless attention dropout is on,
    # then sdpa. A dense mask (decoding, KV cache) always runs sdpa or reference. docs/attention.md.
    attention_backend: str = "sdpa"
    # Where the LayerNorms sit in a block (glm.GLMBlock; SwissArmyTransformer's layernorm_order):
    # "deepnorm" (GLM-130B) post-LN with residual alpha; "post" the same with alpha 1; "pre";
    # "sandwich" pre-LN plus a LayerNorm on each branch output. The others exist for ablations.
    layernorm_order: str = "deepnorm"
    # The reference backend's softmax: "fp32" (GLM-130B's fix) or "half", in the compute dtype
    # (fp16/bf16 under autocast), as before the fix. SDPA always accumulates in fp32.
    attention_softmax: str = "fp32"
    # The prefix-LM kernel: "auto" = flash varlen on CUDA when torch has it, else FlexAttention on
    # CUDA, the SDPA loop elsewhere; or one of varlen, varlen_packed, flex, loop.
    prefix_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.inner_hidden_size is None:
            self.inner_hidden_size = 4 * self.hidden_size
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNorm residual scale sqrt(2N): 11.832 for GLM-130B's 70 layers."""
        n = self.deepnorm_num_layers if self.deepnorm_num_layers is not None else self.num_layers
        return (2.0 * n) ** 0.5

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in SHAPE_FIELDS:
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size}); pick a head count such that hidden_size / heads is whole"
            )
        rotary_dims = self.head_dim // 2 if self.position_encoding == "2d" else self.head_dim
        if rotary_dims % 2:
            raise ConfigError(
                f"head dim {self.head_dim} cannot be rotated: rotary needs an even number of "
                f"dims per {'half ' if self.position_encoding == '2d' else ''}head "
                f"({'a multiple of 4 for 2-D rotary' if self.position_encoding == '2d' else 'an even head dim'})"
            )
        for name, allowed in (
            ("position_encoding", POSITION_ENCODINGS),
            ("rotary_dtype", ROTARY_DTYPES),
            ("ffn", FFN_KINDS),
            ("attention_backend", ATTENTION_BACKENDS),
            ("layernorm_order", LAYERNORM_ORDERS),
            ("attention_softmax", ATTENTION_SOFTMAX_DTYPES),
            ("prefix_kernel", PREFIX_KERNELS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.attention_softmax != "fp32" and self.attention_backend != "reference":
            raise ConfigError(
                f"attention_softmax {self.attention_softmax!r} needs attention_backend 'reference': "
                f"the {self.attention_backend} backend always takes the softmax in fp32"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            check_field(name, getattr(self, name), float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        if self.attention_backend == "prefix" and self.attention_dropout > 0:
            raise ConfigError(
                f"attention_backend prefix has no attention dropout (flash varlen and FlexAttention "
                f"have none) but attention_dropout is {self.attention_dropout}; set attention_dropout "
                "0, or use attention_backend sdpa (or auto, which picks sdpa when dropout is on)"
            )
        check_field("layernorm_epsilon", self.layernorm_epsilon, float, lambda v: v > 0, "positive")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.deepnorm_num_layers is not None:
            check_field(
                "deepnorm_num_layers", self.deepnorm_num_layers, int, lambda v: v > 0, "a positive integer or null"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GLMConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # SPEC section 1. vocab 150528 = 150000 text ids + 8 specials, padded to a multiple of 768
    # (= 8 tensor-parallel shards x 96) so every shard holds the same number of rows.
    "glm-130b": dict(
        num_layers=70,
        hidden_size=12288,
        num_attention_heads=96,
        vocab_size=150528,
        inner_hidden_size=32768,
        max_sequence_length=2048,
    ),
    # ChatGLM-6B: 2-D rotary, plain tanh-GELU FFN, untied lm_head, alpha fixed at sqrt(2 * 28).
    # Its reference code also builds rotary tables in fp16.
    "chatglm-6b": dict(
        num_layers=28,
        hidden_size=4096,
        num_attention_heads=32,
        vocab_size=130528,
        inner_hidden_size=16384,
        max_sequence_length=2048,
        position_encoding="2d",
        ffn="gelu",
        tie_word_embeddings=False,
        deepnorm_num_layers=28,
    ),
    # The oracle fixtures' shape: 2 layers, hidden 64; what the parity tests run.
    "glm-tiny": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=1000,
        inner_hidden_size=160,
        max_sequence_length=128,
    ),
    # ~1.2B parameters: GLM-130B's vocabulary and head dimension (128) at hidden 2048, one GPU's
    # worth; the benchmarks' GPU shape. 18 x 12 h^2 + the 150528-row embedding = 1.21B; inner 5504 =
    # 8/3 x 2048 rounded up to a multiple of 128 (INT4/INT8 groups of 128 divide it).
    "glm-1b": dict(
        num_layers=18,
        hidden_size=2048,
        num_attention_heads=16,
        vocab_size=150528,
        inner_hidden_size=5504,
        max_sequence_length=2048,
    ),
    # ~9M parameters: a CPU-sized model (the demo narrows it, configs/demo.yaml). inner 640:
    # GLM-130B's 8/3 x hidden (683) rounded down to a multiple of 128, so INT4/INT8 groups of 128
    # divide every weight's input dimension.
    "glm-10m": dict(
        num_layers=6,
        hidden_size=256,
        num_attention_heads=8,
        vocab_size=16384,
        inner_hidden_size=640,
        max_sequence_length=512,
    ),
}
