"""`glm130b convert`: any checkpoint format to any other (our model directory, official tensor-parallel
shards of any degree, a Hugging Face folder), tensor by tensor from memory-mapped or streamed input,
with an optional dtype cast and INT8/INT4 quantization on the way."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from glm130b import __version__
from glm130b.checkpoint.formats import open_source
from glm130b.checkpoint.huggingface import KEY_PREFIX, specials_of
from glm130b.checkpoint.model_dir import CONFIG_FILE, save_config
from glm130b.checkpoint.official import DEFAULT_ITERATION, write_official
from glm130b.checkpoint.quantized import check_quantizable, quantized_specs, quantized_tensors
from glm130b.checkpoint.safetensors import write_sharded
from glm130b.checkpoint.sources import (
    TensorSource,
    TensorSpec,
    check_against_config,
    quantization_of,
    read_tensor,
)
from glm130b.core.atomic import publish_directory, temporary_path
from glm130b.core.config_io import read_mapping
from glm130b.core.errors import CheckpointError
from glm130b.interop.huggingface import write_hf_extras
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import SCALE_SUFFIX
from glm130b.tokenizer.specials import GLM130B_TOKENS, SpecialTokens
from glm130b.tokenizer.tokenizers import load_tokenizer

TARGETS = ("dir", "official", "hf")
# Shard size of written safetensors: Hugging Face's default (a 130B fp16 model becomes ~52 files).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
TOKENIZER_DIR = "tokenizer"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating-point weights to `dtype`; packed integers and quantization scales (fp16) as they are."""
    if dtype is None or not tensor.is_floating_point() or name.endswith(SCALE_SUFFIX):
        return tensor
    return tensor.to(dtype)


def _plain_tensors(source: TensorSource, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole tensors (what the official writer splits)."""
    for spec in source.specs():
        yield spec.name, _cast(spec.name, read_tensor(source, spec.name), dtype)


def _plain_blocks(source: TensorSource, dtype: torch.dtype | None) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """Each tensor as cast row blocks (what the safetensors writer streams)."""
    for spec in source.specs():
        yield spec.name, (_cast(spec.name, block, dtype) for block in source.row_blocks(spec.name))


def _output(
    source: TensorSource, dtype: torch.dtype | None, scheme: QuantScheme | None, whole: bool
) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor | Iterator[torch.Tensor]]]]:
    specs = source.specs()
    if scheme is not None:
        cast = [TensorSpec(s.name, dtype if dtype and s.dtype.is_floating_point else s.dtype, s.shape) for s in specs]
        return quantized_specs(cast, scheme), quantized_tensors(source, scheme, dtype)
    cast = [
        TensorSpec(
            s.name,
            dtype if dtype and s.dtype.is_floating_point and not s.name.endswith(SCALE_SUFFIX) else s.dtype,
            s.shape,
        )
        for s in specs
    ]
    return cast, _plain_tensors(source, dtype) if whole else _plain_blocks(source, dtype)


def special_tokens(src: Path) -> tuple[SpecialTokens, int | None]:
    """The special-token ids of the checkpoint at `src` and its tokenizer's vocabulary (None if
    unknown): its tokenizer folder says them, else a Hugging Face folder's config, else GLM-130B's."""
    if (src / TOKENIZER_DIR).is_dir():
        tokenizer = load_tokenizer(src / TOKENIZER_DIR)
        return tokenizer.specials, tokenizer.vocab_size
    if (src / CONFIG_FILE).is_file():
        data = read_mapping(src / CONFIG_FILE, "model config")
        if "model_type" in data:
            return specials_of(src, data), None
    return GLM130B_TOKENS, None


def prepare_destination(destination: Path, overwrite: bool) -> Path:
    """Refuse a non-empty destination unless `overwrite`; returns the hidden staging folder beside it
    (renamed into place only when complete, so a failed run leaves no half-written output)."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        raise CheckpointError(f"{destination} exists and is not empty; choose a new folder or pass --overwrite")
    staging = temporary_path(destination)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "dir",
    tp: int = 1,
    dtype: torch.dtype | None = None,
    scheme: QuantScheme | None = None,
    preset: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the checkpoint at `src` to `dst` in format `to`; returns `dst`. Host memory: about one
    output tensor (plus page cache of the memory-mapped input)."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    if tp < 1 or (tp > 1 and to != "official"):
        raise CheckpointError("--tp N applies to --to official (the degree of the written shards), N >= 1")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise CheckpointError("the destination is the source folder; write the converted model to a new folder")
    source = open_source(src, preset)
    check_against_config(source, src)
    if to == "official" and source.config.layernorm_order != "deepnorm":
        raise CheckpointError(
            f"{src} has layernorm_order {source.config.layernorm_order!r}; the official format "
            "holds DeepNorm models only: convert it to a model directory or a Hugging Face folder"
        )
    if scheme is not None:
        check_quantizable(source, scheme)
    if to != "dir" and (scheme is not None or quantization_of(source) is not None):
        raise CheckpointError(
            f"--to {to} holds floating-point weights (the official runtime and transformers "
            "quantize after loading); convert to a model directory to quantize"
        )
    staging = prepare_destination(dst, overwrite)
    try:
        specs, tensors = _output(source, dtype, scheme, whole=to == "official")
        tensors = tqdm(tensors, total=len(specs), desc=f"convert to {to}", unit="tensor", disable=not progress)
        metadata = {k: v for k, v in source.metadata.items() if k in ("tokenizer_fingerprint", "step")}
        metadata = {
            "format": "glm130b",
            **metadata,
            **(scheme.to_metadata() if scheme else {}),
            **(quantization_of(source).to_metadata() if quantization_of(source) else {}),
        }
        plain = [(s.name, s.dtype, s.shape) for s in specs]
        if to == "official":
            write_official(source, staging, tp, tensors, source.metadata.get("iteration", DEFAULT_ITERATION))
        elif to == "hf":
            write_sharded(
                staging,
                [(KEY_PREFIX + n, d, s) for n, d, s in plain],
                ((KEY_PREFIX + n, t) for n, t in tensors),
                metadata,
                max_shard_bytes,
            )
            floating = [s.dtype for s in specs if s.dtype.is_floating_point]
            write_hf_extras(
                staging,
                source.config,
                *special_tokens(src),
                DTYPE_NAMES.get(floating[0], "float32") if floating else "float32",
                __version__,
            )
        else:
            write_sharded(staging, plain, tensors, metadata, max_shard_bytes)
            save_config(source.config, staging)
        if (src / TOKENIZER_DIR).is_dir():
            shutil.copytree(src / TOKENIZER_DIR, staging / TOKENIZER_DIR)
        if dst.exists():
            shutil.rmtree(dst)
        publish_directory(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst
