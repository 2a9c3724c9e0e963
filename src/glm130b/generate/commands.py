"""Command-line entry point of this package: `glm130b generate` (one-shot or interactive)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from glm130b.adapters.folder import load_model_with_adapter
from glm130b.checkpoint.model_dir import load_model
from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import InputError
from glm130b.generate.api import generate, generate_text, stream_text
from glm130b.generate.decode import DEFAULT_MAX_NEW_TOKENS
from glm130b.generate.strategies import BeamSearch, Greedy, Sampling, Strategy
from glm130b.model.glm import GLM
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import QuantizedLinear, quantize_model
from glm130b.tokenizer.tokenizers import load_tokenizer


def _load_for_cli(args: argparse.Namespace):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise InputError(f"--checkpoint {checkpoint} is not a directory: give a model directory "
                         "(config.json + model.safetensors, as written by glm130b)")
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else checkpoint / "tokenizer"
    if not tokenizer_dir.exists():
        raise InputError(f"no tokenizer at {tokenizer_dir}: pass --tokenizer DIR (a folder written by "
                         "glm130b's tokenizer, or one holding ice_text.model)")
    tokenizer = load_tokenizer(tokenizer_dir)
    if args.adapter:  # without --quantized: quantized as the adapter was trained, if it was
        scheme = QuantScheme(args.bits, args.group_size) if args.quantized else None
        return load_model_with_adapter(checkpoint, args.adapter, device, dtype, scheme), tokenizer
    model = load_model(checkpoint, device=device, dtype=dtype)
    if args.quantized:
        model = _quantize(model, args.bits, args.group_size)
    return model.eval(), tokenizer


def _quantize(model: GLM, bits: int, group_size: int | None) -> GLM:
    """Weight-only quantization of the loaded float model (a directory written by `glm130b quantize`
    is already quantized: load_model sees that and needs no flag)."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return model
    return quantize_model(model, QuantScheme(bits, group_size))


def _strategy_from_args(args: argparse.Namespace) -> Strategy:
    if args.strategy == "sample":
        return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.strategy == "beam":
        return BeamSearch(num_beams=args.num_beams, length_penalty=args.length_penalty,
                          no_repeat_ngram_size=args.no_repeat_ngram, min_length=args.min_length)
    return Greedy()


def _answer(model, tokenizer, prompt: str, args, strategy: Strategy, out) -> None:
    if args.no_stream:
        print(generate_text(model, tokenizer, prompt, strategy, args.max_new_tokens, compile=args.compile), file=out)
        return
    for piece in stream_text(model, tokenizer, prompt, strategy, args.max_new_tokens, compile=args.compile):
        print(piece, end="", file=out, flush=True)  # the prompt text, then each blank as it arrives
    print(file=out)


def cmd_generate(args: argparse.Namespace) -> int:
    strategy = _strategy_from_args(args)
    model, tokenizer = _load_for_cli(args)
    if args.prompts:
        if len(args.prompts) > 1:  # a batch: all prompts at once, printed in order
            for result in generate(model, tokenizer, args.prompts, strategy, args.max_new_tokens, compile=args.compile):
                print(result.text)
        else:
            _answer(model, tokenizer, args.prompts[0], args, strategy, sys.stdout)
        return 0
    print("glm130b generate: type a prompt ([MASK] blanks, [gMASK] to continue); an empty line or Ctrl-D ends.",
          file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            return 0
        if not prompt.strip():
            return 0
        try:
            _answer(model, tokenizer, prompt, args, strategy, sys.stdout)
        except InputError as err:  # keep the session going after a bad prompt
            print(f"glm130b: {err}", file=sys.stderr)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help='text with [MASK] or [gMASK] (none: [gMASK] appended); '
                                              'several prompts run as one batch; none starts an interactive session')
    p.add_argument("--checkpoint", required=True, help="model directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    p.add_argument("--adapter", help="a LoRA or P-tuning v2 adapter folder (glm130b finetune) to load onto the model")
    p.add_argument("--quantized", action="store_true", help="quantize the linear weights on load (weight-only)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits for --quantized")
    p.add_argument("--group-size", type=int, help="scales per group of input columns for --quantized "
                                                  "(default: one per output row, GLM-130B's scheme)")
    p.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="greedy")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="new tokens per blank")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.7, help="the official default")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram", type=int, default=3)
    p.add_argument("--min-length", type=int, default=0)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on the GPU)")
    p.add_argument("--no-stream", action="store_true", help="print each answer whole instead of as it arrives")

