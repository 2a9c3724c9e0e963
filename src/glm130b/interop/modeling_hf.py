"""GLM as a Hugging Face transformers model: `GLMHFConfig` and `GLMForCausalLM` (logits, loss, `generate`,
PEFT), a thin wrapper around glm130b's own GLM so the arithmetic is the same code.

Inputs: give `position_ids` and a bool `attention_mask` [B, 1, S, S] (True = blocked) for full
control, or only `input_ids` (with an optional 0/1 padding mask [B, S]): a row holding <sop> then
follows the GLM prompt rule (its context bidirectional, positions as glm130b.generate builds them),
any other row is read causally. This file is also copied, with the modules it needs, into exported
folders for `trust_remote_code=True` users (glm130b.interop.bundle), so it imports nothing else.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from glm130b.generate.inputs import build_generation_batch
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.tokenizer.specials import GLM130B_TOKENS, SpecialTokens

MODEL_TYPE = "glm130b"
IGNORE_INDEX = -100  # labels the loss skips, as in every Hugging Face causal LM


class GLMHFConfig(PretrainedConfig):
    """`glm`: the GLMConfig fields; `special_tokens`: the SpecialTokens ids."""

    model_type = MODEL_TYPE

    def __init__(self, glm: dict | None = None, special_tokens: dict | None = None, **kwargs):
        self.glm = dict(glm or GLMConfig.from_preset("glm-tiny").to_dict())
        self.special_tokens = dict(special_tokens or asdict(GLM130B_TOKENS))
        kwargs.setdefault("tie_word_embeddings", self.glm.get("tie_word_embeddings", True))
        kwargs.setdefault("pad_token_id", self.special_tokens["pad"])
        kwargs.setdefault("eos_token_id", [self.special_tokens["eop"], self.special_tokens["eos"]])
        super().__init__(**kwargs)

    def to_glm_config(self) -> GLMConfig:
        return GLMConfig.from_dict(self.glm)

    @property
    def specials(self) -> SpecialTokens:
        return SpecialTokens(**self.special_tokens)


class GLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GLMHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config: GLMHFConfig):
        super().__init__(config)
        self.model = GLM(config.to_glm_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; training from scratch is glm130b's own trainer's job."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.transformer.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if position_ids is not None and attention_mask is not None and attention_mask.dim() == 4:
            logits = self.model(input_ids, position_ids, attention_mask.bool())
        else:
            logits = self._forward_rows(input_ids, attention_mask)
        loss = None
        if labels is not None:  # next-token loss: logits at t predict the label at t + 1
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _forward_rows(self, input_ids: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """Each row on its own (no padding inside a forward), scattered back to the input layout."""
        specials, glm = self.config.specials, self.model.config
        logits = torch.zeros(
            *input_ids.shape, glm.vocab_size, dtype=self.model.output_weight.dtype, device=input_ids.device
        )
        for b in range(input_ids.shape[0]):
            keep = padding[b].bool() if padding is not None else torch.ones_like(input_ids[b], dtype=torch.bool)
            tokens = input_ids[b][keep].tolist()
            if specials.sop in tokens:
                inputs = build_generation_batch([tokens], specials, glm.position_encoding, glm.max_sequence_length)
                position_ids, mask = inputs.position_ids, inputs.attention_mask
            else:
                n = len(tokens)
                position_ids = torch.arange(n).unsqueeze(0)
                if glm.position_encoding == "2d":
                    position_ids = torch.stack((position_ids, torch.zeros_like(position_ids)), dim=1)
                mask = ~torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
            device = input_ids.device
            row = self.model(torch.tensor([tokens], device=device), position_ids.to(device), mask.to(device))
            logits[b, keep] = row[0].to(logits.dtype)
        return logits

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> dict:
        """No KV cache through this wrapper: every step is a full forward (glm130b.generate is the
        fast path)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
