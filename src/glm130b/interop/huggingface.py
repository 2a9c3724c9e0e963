"""Writing a Hugging Face folder: config.json and generation_config.json for transformers and the
self-contained modelling code for trust_remote_code (the weights are written by glm130b.checkpoint)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from glm130b.checkpoint.huggingface import MODEL_TYPE
from glm130b.checkpoint.model_dir import CONFIG_FILE
from glm130b.core.atomic import atomic_write_text
from glm130b.generate.decode import banned_tokens
from glm130b.interop.bundle import CODE_FILE, bundled_source
from glm130b.model.config import GLMConfig
from glm130b.tokenizer.specials import SpecialTokens

GENERATION_CONFIG_FILE = "generation_config.json"
TORCH_DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def hf_config_dict(config: GLMConfig, specials: SpecialTokens, dtype_name: str, version: str) -> dict:
    """The config.json of an exported folder: what GLMHFConfig reads, plus the Auto-class map."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GLMForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{CODE_FILE[:-3]}.GLMHFConfig",
            "AutoModelForCausalLM": f"{CODE_FILE[:-3]}.GLMForCausalLM",
        },
        "glm": config.to_dict(),
        "special_tokens": asdict(specials),
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": specials.pad,
        "eos_token_id": [specials.eop, specials.eos],
        "torch_dtype": dtype_name,
        "glm130b_version": version,
    }


def generation_config_dict(config: GLMConfig, specials: SpecialTokens, tokenizer_vocab: int | None) -> dict:
    """generation_config.json: transformers' `generate` stops at <eop>/eos and never emits the tokens
    glm130b never generates (mask tokens, <sop>, pad, embedding rows past the tokenizer)."""
    return {
        "eos_token_id": [specials.eop, specials.eos],
        "pad_token_id": specials.pad,
        "suppress_tokens": banned_tokens(specials, config.vocab_size, tokenizer_vocab),
    }


def write_hf_extras(
    directory: Path,
    config: GLMConfig,
    specials: SpecialTokens,
    tokenizer_vocab: int | None,
    dtype_name: str,
    version: str,
) -> None:
    """config.json, generation_config.json and the modelling code of an exported folder (the weights
    are written apart)."""
    atomic_write_text(
        directory / CONFIG_FILE, json.dumps(hf_config_dict(config, specials, dtype_name, version), indent=2) + "\n"
    )
    atomic_write_text(
        directory / GENERATION_CONFIG_FILE,
        json.dumps(generation_config_dict(config, specials, tokenizer_vocab), indent=2) + "\n",
    )
    atomic_write_text(directory / CODE_FILE, bundled_source(version))
