"""`glm130b serve`: load a model directory and serve it over HTTP (docs/serving.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from glm130b.core.errors import InputError
from glm130b.generate.loading import load_for_inference
from glm130b.serve import limits
from glm130b.serve.engine import Engine

# The HTTP stack is the `serve` extra: without it every other command still works, and this one
# says what to install.
SERVE_EXTRA = ("fastapi", "starlette", "uvicorn", "prometheus_client")
try:
    import uvicorn

    from glm130b.serve.app import create_app

    MISSING = None
except ImportError as err:
    if (err.name or "").split(".")[0] not in SERVE_EXTRA:
        raise
    MISSING = err.name

QUANTIZED_BITS = {"int8": 8, "int4": 4}


def load_for_serving(args: argparse.Namespace):
    bits = QUANTIZED_BITS[args.quantized] if args.quantized else None
    return load_for_inference(
        args.model, args.tokenizer, args.device, args.dtype, bits, args.group_size, adapter=args.adapter
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if MISSING is not None:
        raise InputError(
            f"glm130b serve needs the `serve` extra ({MISSING} is not installed): pip install 'glm130b[serve]'"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_serving(args)
    engine = Engine(
        model,
        tokenizer,
        max_batch=args.max_batch,
        max_total_tokens=args.max_total_tokens,
        max_queue=args.max_queue,
        batch_invariant=args.batch_invariant,
    )
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(
        engine,
        name,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout,
    )
    print(
        f"glm130b serve: {name} on http://{args.host}:{args.port} (playground at /, API at /v1/completions; "
        f"{args.max_batch} rows of {engine.max_total_tokens} tokens)",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn's own SIGTERM/SIGINT handling: stop accepting, let open requests finish (up to
    # --drain-timeout), then the app's shutdown stops the engine.
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout
    )
    uvicorn.Server(config).run()
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json + model.safetensors + tokenizer/)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: MODEL/tokenizer)")
    p.add_argument("--adapter", help="a LoRA or P-tuning v2 adapter folder (glm130b finetune) to load onto the model")
    p.add_argument("--model-name", help="the model id clients pass (default: the directory's name)")
    p.add_argument(
        "--quantized",
        choices=tuple(QUANTIZED_BITS),
        help="quantize the linear weights on load "
        "(weight-only; a directory written by `glm130b quantize` needs no flag)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="scales per group of input columns for --quantized (default: one per output row, GLM-130B's scheme)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--max-batch", type=int, default=limits.MAX_BATCH, help="cache rows: sequences decoded together")
    p.add_argument(
        "--max-total-tokens",
        type=int,
        help="prompt + generated tokens per sequence, the length "
        "of each cache row (default: the model's max_sequence_length); KV memory is "
        "2 x layers x hidden x max_batch x this x bytes per value",
    )
    p.add_argument(
        "--max-queue", type=int, default=limits.MAX_QUEUE, help="sequences that may wait for a row; more: HTTP 429"
    )
    p.add_argument("--request-timeout", type=float, default=limits.REQUEST_TIMEOUT_S, help="seconds; then HTTP 504")
    p.add_argument("--max-body-bytes", type=int, default=limits.MAX_BODY_BYTES, help="larger bodies: HTTP 413")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=limits.DRAIN_TIMEOUT_S,
        help="seconds open requests get to finish after SIGTERM",
    )
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="bit-for-bit the same answer whatever else runs: "
        "every step computes all max-batch rows and prompts are prefilled one by one (slower)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level",
    )
