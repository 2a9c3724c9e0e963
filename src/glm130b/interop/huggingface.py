"""Hugging Face folders: read ours and ChatGLM-6B's, write ours (config.json for transformers, sharded
safetensors under `model.`, and the self-contained modelling code for trust_remote_code)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from glm130b.checkpoint.model_dir import CONFIG_FILE
from glm130b.checkpoint.sources import SafetensorsSource, TensorSource, TorchFilesSource, safetensors_files, torch_files
from glm130b.core.atomic import atomic_write_text
from glm130b.core.errors import CheckpointError
from glm130b.generate.decode import banned_tokens
from glm130b.interop.bundle import CODE_FILE, bundled_source
from glm130b.model.config import GLMConfig
from glm130b.tokenizer.specials import GLM130B_TOKENS, SpecialTokens

MODEL_TYPE = "glm130b"
CHATGLM_MODEL_TYPE = "chatglm"
GENERATION_CONFIG_FILE = "generation_config.json"
KEY_PREFIX = "model."  # GLMForCausalLM keeps the GLM under `.model`
# ChatGLM-6B's config.json fields that are GLMConfig fields under the same name.
CHATGLM_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "inner_hidden_size",
                  "max_sequence_length", "layernorm_epsilon")
TORCH_DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def chatglm_config(data: dict, where: Path) -> GLMConfig:
    """ChatGLM-6B's config.json as a GLMConfig: the chatglm-6b preset's switches (2-D rotary,
    tanh-GELU FFN, untied head, alpha from 28 layers) with the folder's shape."""
    if data.get("quantization_bit"):
        raise CheckpointError(f"{where} is ChatGLM's own {data['quantization_bit']}-bit checkpoint; convert its "
                              "fp16 release and quantize with `glm130b quantize` instead")
    if data.get("pre_seq_len"):
        raise CheckpointError(f"{where} holds a P-tuning prefix (pre_seq_len {data['pre_seq_len']}); "
                              "load the base model's folder")
    shape = {k: data[k] for k in CHATGLM_FIELDS if k in data}
    return GLMConfig.from_preset("chatglm-6b", **shape)


def chatglm_specials(data: dict) -> SpecialTokens:
    """ChatGLM-6B's ids: [MASK] at mask_token_id and the rest at fixed offsets from it; eos is <eop>."""
    mask = data.get("mask_token_id", 130000)
    eop = data.get("eos_token_id", mask + 5)
    return SpecialTokens(mask=mask, gmask=data.get("gmask_token_id", mask + 1), smask=mask + 2,
                         sop=data.get("bos_token_id", mask + 4), eop=eop, eos=eop, pad=data.get("pad_token_id", 3))


def open_huggingface(directory: Path, data: dict) -> TensorSource:
    """A Hugging Face folder whose config.json is `data`: ours (model_type glm130b) or ChatGLM-6B's."""
    model_type = data.get("model_type")
    if model_type == MODEL_TYPE:
        config, prefix = GLMConfig.from_dict(data["glm"]), KEY_PREFIX
    elif model_type == CHATGLM_MODEL_TYPE:
        config, prefix = chatglm_config(data, directory), ""
    else:
        raise CheckpointError(f"{directory / CONFIG_FILE} has model_type {model_type!r}; glm130b reads "
                              f"'{MODEL_TYPE}' (its own exports) and '{CHATGLM_MODEL_TYPE}' (ChatGLM-6B)")
    if files := safetensors_files(directory):
        return SafetensorsSource(config, files, prefix)
    if files := torch_files(directory):
        return TorchFilesSource(config, files, prefix)
    raise CheckpointError(f"{directory} has a config.json but no weights (model.safetensors, a safetensors index, "
                          "pytorch_model.bin or its index)")


def specials_of(directory: Path, data: dict) -> SpecialTokens:
    if data.get("model_type") == CHATGLM_MODEL_TYPE:
        return chatglm_specials(data)
    return SpecialTokens(**data.get("special_tokens", asdict(GLM130B_TOKENS)))


def hf_config_dict(config: GLMConfig, specials: SpecialTokens, dtype_name: str, version: str) -> dict:
    """The config.json of an exported folder: what GLMHFConfig reads, plus the Auto-class map."""
    return {"model_type": MODEL_TYPE, "architectures": ["GLMForCausalLM"],
            "auto_map": {"AutoConfig": f"{CODE_FILE[:-3]}.GLMHFConfig",
                         "AutoModelForCausalLM": f"{CODE_FILE[:-3]}.GLMForCausalLM"},
            "glm": config.to_dict(), "special_tokens": asdict(specials),
            "tie_word_embeddings": config.tie_word_embeddings, "pad_token_id": specials.pad,
            "eos_token_id": [specials.eop, specials.eos], "torch_dtype": dtype_name,
            "glm130b_version": version}


def generation_config_dict(config: GLMConfig, specials: SpecialTokens, tokenizer_vocab: int | None) -> dict:
    """generation_config.json: transformers' `generate` stops at <eop>/eos and never emits the tokens
    glm130b never generates (mask tokens, <sop>, pad, embedding rows past the tokenizer)."""
    return {"eos_token_id": [specials.eop, specials.eos], "pad_token_id": specials.pad,
            "suppress_tokens": banned_tokens(specials, config.vocab_size, tokenizer_vocab)}


def write_hf_extras(directory: Path, config: GLMConfig, specials: SpecialTokens, tokenizer_vocab: int | None,
                    dtype_name: str, version: str) -> None:
    """config.json, generation_config.json and the modelling code of an exported folder (the weights
    are written apart)."""
    atomic_write_text(directory / CONFIG_FILE,
                      json.dumps(hf_config_dict(config, specials, dtype_name, version), indent=2) + "\n")
    atomic_write_text(directory / GENERATION_CONFIG_FILE,
                      json.dumps(generation_config_dict(config, specials, tokenizer_vocab), indent=2) + "\n")
    atomic_write_text(directory / CODE_FILE, bundled_source(version))
