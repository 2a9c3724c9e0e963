"""The GLM forward pass (SPEC.md sections 3-4): embedding, DeepNorm layers, final LayerNorm, head.

Parameter names are the official checkpoint keys (`transformer.layers.3.mlp.dense_h_to_4h.weight`),
so `model.load_state_dict(official_state_dict)` needs no renaming. Shapes in comments:
B batch, S new tokens, T keys (cached + new), H heads, D head dim, C hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm130b.core.errors import InputError
from glm130b.model.attention import prepare_mask
from glm130b.model.config import GLMConfig
from glm130b.model.kv_cache import KVCache
from glm130b.model.masks import CompactMask
from glm130b.model.prefix_attention import PrefixLMPlan, attend_prefix_lm

ROTARY_BASE = 10000.0
# The reference fills blocked scores with -10000, not -inf: exp(-10000) is already 0 in fp32, and a
# row with every key blocked (a pad row) then stays finite instead of turning into NaN.
REFERENCE_MASK_FILL = -10000.0


# ---------------------------------------------------------------------------------- rotary
def rotary_cos_sin(positions: torch.Tensor, dim: int, table_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of rotary angles for integer positions [...], each [..., dim] ("rotate half" layout).

    Computed from the positions directly (no cached table: the values are elementwise, so this is
    identical to indexing a table, and a model built on the meta device needs no buffers). With
    table_dtype fp16 this reproduces the official tables bit for bit: inv_freq, positions and angles
    all rounded to half precision before the cos/sin (SPEC.md section 4). Autocast is off here: the
    tables keep table_dtype under any autocast (CPU bf16 autocast refuses to concatenate fp16).
    """
    with torch.autocast(positions.device.type, enabled=False):
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
        angles = positions.to(table_dtype).unsqueeze(-1) * inv_freq.to(table_dtype)  # [..., dim/2]
        angles = torch.cat((angles, angles), dim=-1)  # [..., dim]: dims i and i + dim/2 rotate together
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated by cos/sin [B, S, D]: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # [B, S, 1, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class RotaryAngles:
    """cos/sin for the new tokens of one forward, shared by every layer. 1-D: one pair [B, S, D];
    2-D: a pair per head-dim half, rotated by the position id and the block position id."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, position_ids: torch.Tensor, config: GLMConfig) -> RotaryAngles:
        table_dtype = torch.float16 if config.rotary_dtype == "fp16" else torch.float32
        if config.position_encoding == "2d":  # position_ids [B, 2, S]
            half = config.head_dim // 2
            return cls(
                [
                    rotary_cos_sin(position_ids[:, 0], half, table_dtype),
                    rotary_cos_sin(position_ids[:, 1], half, table_dtype),
                ]
            )
        return cls([rotary_cos_sin(position_ids, config.head_dim, table_dtype)])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.pairs) == 1:
            return apply_rotary(x, *self.pairs[0])
        halves = x.chunk(2, dim=-1)
        return torch.cat([apply_rotary(h, *pair) for h, pair in zip(halves, self.pairs)], dim=-1)


# ---------------------------------------------------------------------------------- blocks
class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_number: int):
        super().__init__()
        self.config = config
        self.layer_number = layer_number  # 1-based: the reference's score scaling uses (l + 1)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)
        # P-tuning v2 (glm130b.finetune.ptuning) attaches a module here: learned keys and values that
        # every query sees ahead of the tokens' own, cached or not. None: plain attention.
        self.prefix: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryAngles,
        mask: torch.Tensor | PrefixLMPlan,
        kv_cache: KVCache | None,
        layer: int,
        cache_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        D = self.config.head_dim
        # Rows of the qkv weight are grouped per head as [q_h; k_h; v_h], not all-q/all-k/all-v.
        # -1, not num_attention_heads: tensor parallel may have sharded the heads
        q, k, v = self.query_key_value(x).view(B, S, -1, 3 * D).chunk(3, dim=-1)  # [B, S, H, D] each
        q, k = rotary.apply(q), rotary.apply(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if kv_cache is not None:
            k, v = kv_cache.store(layer, k, v, cache_slots)  # [B, H, T, D]
        if self.prefix is not None:  # P-tuning v2 prefixes (glm130b.adapters): dense masks only
            k, v, mask = self.prefix(k, v, mask)  # [B, H, P + T, D]; mask [B, 1, S, P + T]
        if isinstance(mask, PrefixLMPlan):  # the prefix-LM kernels (GLM.forward built the plan)
            context = attend_prefix_lm(mask, q, k, v)
        elif self.config.attention_backend == "reference":
            context = self._reference_attention(q, k, v, mask)
        else:  # sdpa, and the dense mask of any other backend (decoding)
            dropout = self.config.attention_dropout if self.training else 0.0
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(B, S, -1)  # [B, S, H * D]: heads concatenated in head order
        return self.output_dropout(self.dense(context))

    def _reference_attention(self, q, k, v, mask):
        """The official arithmetic: q is divided by sqrt(D) * l so fp16 scores stay in range, blocked
        scores are filled with -10000, then the scores are multiplied back by l and the softmax is
        taken in fp32 (the change that made GLM-130B training converge). attention_softmax "half"
        keeps both in the compute dtype instead, as before that change."""
        coeff = float(self.layer_number)
        scores = torch.matmul(q / (math.sqrt(q.shape[-1]) * coeff), k.transpose(-1, -2))  # [B, H, S, T]
        scores = scores.masked_fill(mask, REFERENCE_MASK_FILL)
        if self.config.attention_softmax == "fp32":
            scores = scores.float()
        # dtype given: CUDA autocast would otherwise run a half softmax in fp32
        probs = torch.softmax(scores * coeff, dim=-1, dtype=scores.dtype).to(v.dtype)
        probs = F.dropout(probs, self.config.attention_dropout, self.training)
        return torch.matmul(probs, v)


class FeedForward(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.kind = config.ffn
        branches = 2 if config.ffn == "geglu" else 1
        self.dense_h_to_4h = nn.Linear(config.hidden_size, branches * config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.dense_h_to_4h(x)
        if self.kind == "geglu":
            value, gate = u.chunk(2, dim=-1)  # the FIRST half is linear, the SECOND goes through GELU
            z = value * F.gelu(gate)  # exact (erf) GELU
        else:
            z = F.gelu(u, approximate="tanh")  # ChatGLM-6B
        return self.dropout(self.dense_4h_to_h(z))


class GLMBlock(nn.Module):
    """Post-LN DeepNorm: the residual adds the NORMALISED input, scaled by alpha = sqrt(2N).

    config.layernorm_order picks another arrangement for ablations (SwissArmyTransformer's names):
    "post" is DeepNorm with alpha 1; "pre" adds each branch to the raw residual stream,
    x + Attn(LN_in(x)), then h + FFN(LN_post(h)); "sandwich" is "pre" with the branch outputs
    normalised again (third_layernorm, fourth_layernorm) before they are added.
    """

    def __init__(self, config: GLMConfig, layer_number: int):
        super().__init__()
        self.order = config.layernorm_order
        self.alpha = config.deepnorm_alpha if self.order == "deepnorm" else 1.0
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = FeedForward(config)
        if self.order == "sandwich":
            self.third_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
            self.fourth_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, x, rotary, mask, kv_cache, layer, cache_slots=None):
        a = self.input_layernorm(x)
        attended = self.attention(a, rotary, mask, kv_cache, layer, cache_slots)
        if self.order in ("deepnorm", "post"):
            h = a * self.alpha + attended
            m = self.post_attention_layernorm(h)
            return m * self.alpha + self.mlp(m)
        if self.order == "sandwich":
            attended = self.third_layernorm(attended)
        h = x + attended
        out = self.mlp(self.post_attention_layernorm(h))
        if self.order == "sandwich":
            out = self.fourth_layernorm(out)
        return h + out


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i + 1) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GLM(nn.Module):
    """`GLM(config)(input_ids, position_ids, attention_mask)` -> logits [B, S, vocab].

    input_ids [B, S] long; position_ids [B, S] (1-D) or [B, 2, S] (2-D); attention_mask bool
    [B, 1, S, T], True = blocked, where T = S for a full forward, cached + S with a KV cache, and
    the cache's max_length with `cache_slots` (the static-shape decode path, see KVCache); or, for a
    full forward, a CompactMask, which config.attention_backend runs (glm130b.model.attention).

    A pipeline stage (glm130b.distributed.pipeline) is this model with the modules it lacks set to
    None, which the forward skips: a stage after the first takes the previous stage's hidden states
    [B, S, C] in place of input_ids, and one before the last returns its hidden states.
    """

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # GLM-130B's embedding gradient shrink (SPEC.md section 10): the embedding lookup and the tied
        # logit weight pass only this share of their gradient (0.1 in the recipe; 1.0 = off). The
        # trainer may change it during a run (the team moved it between 0.1 and 1).
        self.embedding_grad_scale = 1.0
        # Ranks that share each layer's heads (glm130b.distributed.sharded_inference sets it); a KV
        # cache for this model holds num_attention_heads / tensor_parallel_degree heads.
        self.tensor_parallel_degree = 1
        # Official checkpoints may carry rotary inv_freq buffers; rotary is computed, not stored.
        self.register_load_state_dict_pre_hook(_drop_rotary_buffers)

    @property
    def output_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return shrink_gradient(self.transformer.word_embeddings.weight, self.embedding_grad_scale)
        return self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | CompactMask,
        kv_cache: KVCache | None = None,
        check_inputs: bool = True,
        cache_slots: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        logits_where: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """logits_at [B]: one position per row whose logits are wanted (a prefill needs only each
        row's last prompt token: [B, 1, vocab] instead of [B, S, vocab]); logits_where [N]: indices
        into the flattened [B * S] positions, logits [N, vocab] of those only (training needs the
        scored positions alone: the output layer's cost shrinks with them). None = every position."""
        if check_inputs:  # reads values on the host: hot decode loops validate once and pass False
            self.validate_inputs(input_ids, position_ids, attention_mask, kv_cache, cache_slots)
        embeddings = self.transformer.word_embeddings
        # Hidden states come in on a pipeline stage after the first (whose embedding is None, or, on
        # the last stage, the tied weight kept for the output head only).
        if embeddings is not None and not input_ids.is_floating_point():
            x = embeddings(input_ids)  # [B, S, C]: no position embedding, no scaling
            x = shrink_gradient(x, self.embedding_grad_scale)
        else:
            x = input_ids  # [B, S, C]
        rotary = RotaryAngles.build(position_ids, self.config)
        attention_mask = prepare_mask(attention_mask, self.config, x, self.training, kv_cache is not None)
        for i, layer in enumerate(self.transformer.layers):
            if layer is not None:  # None: a layer of another pipeline stage (the index stays global)
                x = layer(x, rotary, attention_mask, kv_cache, i, cache_slots)
        if kv_cache is not None and cache_slots is None:  # with slots the caller tracks what is filled
            kv_cache.length += input_ids.shape[1]
        if self.transformer.final_layernorm is None:  # a pipeline stage before the last
            return x  # [B, S, C]
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at].unsqueeze(1)  # [B, 1, C]
        elif logits_where is not None:
            x = x.flatten(0, 1).index_select(0, logits_where)  # [N, C]
        x = self.transformer.final_layernorm(x)
        return F.linear(x, self.output_weight)  # [B, S, vocab] ([B, 1, vocab] / [N, vocab] when selected)

    def validate_inputs(self, input_ids, position_ids, attention_mask, kv_cache=None, cache_slots=None) -> None:
        cfg = self.config
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        B, S = input_ids.shape
        if S == 0:
            raise InputError("input_ids is empty: give at least one token")
        if S > cfg.max_sequence_length:  # with a KV cache, cached + new is bounded by the cache's length
            raise InputError(
                f"the input has {S} tokens, more than max_sequence_length {cfg.max_sequence_length}; "
                "shorten it or truncate the context on the left"
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise InputError(
                f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); check the tokenizer matches the model"
            )
        want = (B, 2, S) if cfg.position_encoding == "2d" else (B, S)
        if tuple(position_ids.shape) != want:
            raise InputError(
                f"position_ids must have shape {want} for {cfg.position_encoding} positions, "
                f"got {tuple(position_ids.shape)}"
            )
        if int(position_ids.min()) < 0:
            raise InputError(f"position {int(position_ids.min())} is negative; positions start at 0")
        if int(position_ids.max()) >= cfg.max_sequence_length:
            raise InputError(
                f"position {int(position_ids.max())} exceeds max_sequence_length "
                f"{cfg.max_sequence_length} (positions 0..{cfg.max_sequence_length - 1}); "
                "shorten the input or truncate the context on the left"
            )
        if isinstance(attention_mask, CompactMask):
            _check_compact_mask(attention_mask, B, S)
            return
        if attention_mask.dtype != torch.bool:
            raise InputError(f"attention_mask must be bool (True = blocked), got {attention_mask.dtype}")
        if cache_slots is not None:
            if kv_cache is None:
                raise InputError("cache_slots given without a kv_cache: pass the KVCache to write into")
            if (
                tuple(cache_slots.shape) != (S,)
                or int(cache_slots.min()) < 0
                or int(cache_slots.max()) >= kv_cache.max_length
            ):
                raise InputError(
                    f"cache_slots must be {S} slot indices in [0, {kv_cache.max_length}), one "
                    f"per new token; got shape {tuple(cache_slots.shape)}"
                )
            if tuple(attention_mask.shape) != (B, 1, S, kv_cache.max_length):
                raise InputError(
                    f"attention_mask must have shape {(B, 1, S, kv_cache.max_length)} "
                    f"([batch, 1, new tokens, cache slots]) with cache_slots, "
                    f"got {tuple(attention_mask.shape)}"
                )
            return
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and past + S > kv_cache.max_length:
            raise InputError(f"KV cache holds {kv_cache.max_length} tokens; {past} cached + {S} new do not fit")
        if tuple(attention_mask.shape) != (B, 1, S, past + S):
            raise InputError(
                f"attention_mask must have shape {(B, 1, S, past + S)} "
                f"([batch, 1, new tokens, cached + new]), got {tuple(attention_mask.shape)}"
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_compact_mask(mask: CompactMask, B: int, S: int) -> None:
    for name, value in zip(mask._fields, mask):
        if tuple(value.shape) != (B, S):
            raise InputError(
                f"attention_mask.{name} must have shape {(B, S)} (one per token), got {tuple(value.shape)}"
            )
    if mask.in_prefix.dtype != torch.bool or mask.segment_ids.is_floating_point():
        raise InputError(
            f"a CompactMask holds integer segment_ids and bool in_prefix, got {mask.segment_ids.dtype} "
            f"and {mask.in_prefix.dtype}"
        )


def shrink_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Same value as x; the gradient flowing back through it is multiplied by `scale`."""
    if scale == 1.0 or not torch.is_grad_enabled():
        return x
    return x * scale + x.detach() * (1.0 - scale)


def _drop_rotary_buffers(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("rotary_emb.inv_freq")]:
        del state_dict[key]
