"""Command-line entry point of this package: `glm130b generate` (one-shot or interactive)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from glm130b.core.errors import InputError
from glm130b.distributed.parallelize import init_distributed
from glm130b.distributed.sharded_inference import load_sharded_model
from glm130b.generate.api import generate, generate_text, stream_text
from glm130b.generate.decode import DEFAULT_MAX_NEW_TOKENS
from glm130b.generate.loading import default_dtype, load_for_inference, load_tokenizer_for, resolve_device
from glm130b.generate.strategies import BeamSearch, Greedy, Sampling, Strategy
from glm130b.model.glm import GLM


def _load_for_cli(args: argparse.Namespace):
    if args.tp > 1:
        checkpoint = Path(args.checkpoint)
        tokenizer = load_tokenizer_for(checkpoint, args.tokenizer)
        return _load_tensor_parallel(
            args, checkpoint, default_dtype(args.dtype, resolve_device(args.device))
        ), tokenizer
    return load_for_inference(
        args.checkpoint,
        args.tokenizer,
        args.device,
        args.dtype,
        args.bits if args.quantized else None,
        args.group_size,
        adapter=args.adapter,
    )


def _load_tensor_parallel(args: argparse.Namespace, checkpoint: Path, dtype: torch.dtype) -> GLM:
    """This rank's slice of the model, under torchrun with --nproc_per_node equal to --tp."""
    if "RANK" not in os.environ:
        raise InputError(
            f"--tp {args.tp} runs one process per slice: launch with "
            f"torchrun --nproc_per_node {args.tp} -m glm130b.cli generate ..."
        )
    if args.quantized or not args.prompts:
        raise InputError("with --tp, give the prompts on the command line and leave out --quantized")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    rank = init_distributed("nccl" if cuda else "gloo")
    if dist.get_world_size() != args.tp:
        raise InputError(f"--tp {args.tp} but torchrun started {dist.get_world_size()} processes; make them equal")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if rank != 0:  # every rank computes the same tokens; one prints them
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (kept open for the life of the process)
    return load_sharded_model(checkpoint, args.tp, rank, device=device, dtype=dtype)


def _strategy_from_args(args: argparse.Namespace) -> Strategy:
    if args.strategy == "sample":
        return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.strategy == "beam":
        return BeamSearch(
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram,
            min_length=args.min_length,
        )
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
        if len(args.prompts) > 1 or args.json:  # a batch: all prompts at once, printed in order
            results = generate(model, tokenizer, args.prompts, strategy, args.max_new_tokens, compile=args.compile)
            for prompt, result in zip(args.prompts, results, strict=True):
                print(
                    json.dumps({"prompt": prompt, "text": result.text, "blanks": result.blanks}, ensure_ascii=False)
                    if args.json
                    else result.text
                )
        else:
            _answer(model, tokenizer, args.prompts[0], args, strategy, sys.stdout)
        return 0
    print(
        "glm130b generate: type a prompt ([MASK] blanks, [gMASK] to continue); an empty line or Ctrl-D ends.",
        file=sys.stderr,
    )
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
    p.add_argument(
        "prompts",
        nargs="*",
        help="text with [MASK] or [gMASK] (none: [gMASK] appended); "
        "several prompts run as one batch; none starts an interactive session",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model directory (config.json + model.safetensors); with "
        "--tp also official shards or a Hugging Face folder",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree: one process per slice of the model, "
        "under torchrun --nproc_per_node TP (default: %(default)s)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    p.add_argument("--adapter", help="a LoRA or P-tuning v2 adapter folder (glm130b finetune) to load onto the model")
    p.add_argument("--quantized", action="store_true", help="quantize the linear weights on load (weight-only)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits for --quantized")
    p.add_argument(
        "--group-size",
        type=int,
        help="scales per group of input columns for --quantized (default: one per output row, GLM-130B's scheme)",
    )
    p.add_argument(
        "--strategy", choices=("greedy", "sample", "beam"), default="greedy", help="how each next token is chosen"
    )
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="new tokens per blank")
    p.add_argument("--temperature", type=float, default=1.0, help="sample: divides the logits (below 1: surer)")
    p.add_argument("--top-k", type=int, default=0, help="sample: only the k likeliest tokens (0: no limit)")
    p.add_argument("--top-p", type=float, default=0.7, help="the official default")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--num-beams", type=int, default=4, help="beam: hypotheses kept")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam: above 1 favours longer outputs")
    p.add_argument("--no-repeat-ngram", type=int, default=3, help="beam: no n-gram of this size twice (0: off)")
    p.add_argument("--min-length", type=int, default=0, help="beam: no end before this many new tokens")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        help="default: the checkpoint's on cuda (fp16 for the GLM-130B release), fp32 on cpu",
    )
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on the GPU)")
    p.add_argument("--no-stream", action="store_true", help="print each answer whole instead of as it arrives")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON line per prompt: prompt, text and its blanks (answers that hold newlines stay separable)",
    )
