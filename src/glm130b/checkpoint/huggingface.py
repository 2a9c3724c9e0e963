"""Hugging Face folders as TensorSources: ours (model_type glm130b, weights under `model.`) and
ChatGLM-6B's (its config.json fields and key names, pytorch_model-XXXXX-of-XXXXX.bin or safetensors)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from glm130b.checkpoint.model_dir import CONFIG_FILE
from glm130b.checkpoint.safetensors import safetensors_files
from glm130b.checkpoint.sources import SafetensorsSource, TensorSource, TorchFilesSource, torch_files
from glm130b.core.errors import CheckpointError
from glm130b.model.config import SHAPE_FIELDS, GLMConfig
from glm130b.tokenizer.specials import GLM130B_TOKENS, SpecialTokens

MODEL_TYPE = "glm130b"
CHATGLM_MODEL_TYPE = "chatglm"
KEY_PREFIX = "model."  # GLMForCausalLM keeps the GLM under `.model`
# ChatGLM-6B's config.json fields that are GLMConfig fields under the same name.
CHATGLM_FIELDS = (*SHAPE_FIELDS, "layernorm_epsilon")


def chatglm_config(data: dict, where: Path) -> GLMConfig:
    """ChatGLM-6B's config.json as a GLMConfig: the chatglm-6b preset's switches (2-D rotary,
    tanh-GELU FFN, untied head, alpha from 28 layers) with the folder's shape."""
    if data.get("quantization_bit"):
        raise CheckpointError(
            f"{where} is ChatGLM's own {data['quantization_bit']}-bit checkpoint; convert its "
            "fp16 release and quantize with `glm130b quantize` instead"
        )
    if data.get("pre_seq_len"):
        raise CheckpointError(
            f"{where} holds a P-tuning prefix (pre_seq_len {data['pre_seq_len']}); load the base model's folder"
        )
    shape = {k: data[k] for k in CHATGLM_FIELDS if k in data}
    return GLMConfig.from_preset("chatglm-6b", **shape)


def chatglm_specials(data: dict) -> SpecialTokens:
    """ChatGLM-6B's ids: [MASK] at mask_token_id and the rest at fixed offsets from it; eos is <eop>."""
    mask = data.get("mask_token_id", 130000)
    eop = data.get("eos_token_id", mask + 5)
    return SpecialTokens(
        mask=mask,
        gmask=data.get("gmask_token_id", mask + 1),
        smask=mask + 2,
        sop=data.get("bos_token_id", mask + 4),
        eop=eop,
        eos=eop,
        pad=data.get("pad_token_id", 3),
    )


def open_huggingface(directory: Path, data: dict) -> TensorSource:
    """A Hugging Face folder whose config.json is `data`: ours (model_type glm130b) or ChatGLM-6B's."""
    model_type = data.get("model_type")
    if model_type == MODEL_TYPE:
        config, prefix = GLMConfig.from_dict(data["glm"]), KEY_PREFIX
    elif model_type == CHATGLM_MODEL_TYPE:
        config, prefix = chatglm_config(data, directory), ""
    else:
        raise CheckpointError(
            f"{directory / CONFIG_FILE} has model_type {model_type!r}; glm130b reads "
            f"'{MODEL_TYPE}' (its own exports) and '{CHATGLM_MODEL_TYPE}' (ChatGLM-6B)"
        )
    if files := safetensors_files(directory):
        return SafetensorsSource(config, files, prefix)
    if files := torch_files(directory):
        return TorchFilesSource(config, files, prefix)
    raise CheckpointError(
        f"{directory} has a config.json but no weights (model.safetensors, a safetensors index, "
        "pytorch_model.bin or its index)"
    )


def specials_of(directory: Path, data: dict) -> SpecialTokens:
    if data.get("model_type") == CHATGLM_MODEL_TYPE:
        return chatglm_specials(data)
    return SpecialTokens(**data.get("special_tokens", asdict(GLM130B_TOKENS)))
