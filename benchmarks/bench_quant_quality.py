"""Validation perplexity of a trained model in fp32 and quantized (INT8 row, INT4 row, INT4 group-128).

  python benchmarks/bench_quant_quality.py MODEL_DIR VALID_DATA [--windows 64] [--window 256] [--append]

MODEL_DIR is a model directory (config.json + model.safetensors, floating point). VALID_DATA is
held-out token ids: a `.npy` file, or a prepared corpus directory (every `*.tokens.npy` under it,
in name order). The ids are cut into consecutive windows; each window is scored left to right
(causal mask, positions 0..n-1) and perplexity = exp(mean next-token NLL). This is the same
protocol for every row of the table, so the relative changes compare with the paper's (GLM-130B,
WikiText-2: +0.03 % INT8, +2.4 % INT4 row-wise). The table prints to stdout; --append adds it to
benchmarks/RESULTS.md.

Until the demo model exists, a stand-in can be trained here (a few minutes on a CPU):

  python benchmarks/bench_quant_quality.py --train-stand-in CORPUS_DIR OUT_DIR [--steps 600]

trains a 2-layer, hidden-128 GLM on UTF-8 bytes (ids 0-255: a byte-level stand-in tokenizer) of
CORPUS_DIR/train.jsonl.gz with the same causal objective, and writes OUT_DIR/model (a model
directory) and OUT_DIR/valid.npy (bytes of CORPUS_DIR/valid.jsonl.gz) for the run above.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.model.initialization import initialize_glm
from glm130b.quant.format import SUPPORTED_GROUP_SIZES, QuantScheme
from glm130b.quant.linear import QUANTIZED_LINEARS, quantize_model

RESULTS = Path(__file__).parent / "RESULTS.md"
# Relative perplexity change the paper reports for GLM-130B on WikiText-2 (SPEC.md section 7).
PAPER = {"int8-row": "+0.03 %", "int4-row": "+2.4 %"}


def load_tokens(path: Path) -> np.ndarray:
    files = sorted(path.rglob("*.tokens.npy")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"{path} holds no *.tokens.npy files")
    return np.concatenate([np.load(f, mmap_mode="r") for f in files]).astype(np.int64)


def windows(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    usable = min(count, len(tokens) // length)
    if usable == 0:
        raise SystemExit(f"{len(tokens)} tokens do not fill one window of {length}")
    return torch.from_numpy(tokens[: usable * length].reshape(usable, length))


def causal_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of ids [B, L] scored left to right (positions 0..L-1, causal mask)."""
    b, length = ids.shape
    positions = torch.arange(length).expand(b, length)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1).expand(b, 1, length, length)  # True = blocked
    logits = model(ids, positions, causal, check_inputs=False)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
    )


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch_size: int) -> float:
    total = sum(causal_nll(model, data[start : start + batch_size]).item() for start in range(0, len(data), batch_size))
    return math.exp(total / (data.shape[0] * (data.shape[1] - 1)))


def corpus_bytes(path: Path, limit: int) -> np.ndarray:
    """UTF-8 bytes of the documents of a .jsonl.gz corpus file, up to `limit` bytes."""
    chunks, size = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            chunks.append(json.loads(line)["text"].encode() + b"\n")
            size += len(chunks[-1])
            if size >= limit:
                break
    return np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8).astype(np.int64)


def train_stand_in(corpus: Path, out: Path, steps: int, batch_size: int = 16, length: int = 128) -> None:
    """A small byte-level GLM trained for `steps` AdamW steps; see the module docstring."""
    torch.manual_seed(0)
    # Widths divisible by 128 so that every scheme of the table, group-128 included, applies.
    config = GLMConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        vocab_size=256,
        inner_hidden_size=256,
        max_sequence_length=length,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = initialize_glm(GLM(config), seed=0)  # the GLM-130B recipe's init (SPEC.md section 10)
    train = torch.from_numpy(corpus_bytes(corpus / "train.jsonl.gz", 8 * 2**20))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # linear decay to 0
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, len(train) - length, (batch_size,), generator=generator)
        loss = causal_nll(model, torch.stack([train[s : s + length] for s in starts.tolist()])) / (
            batch_size * (length - 1)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f}")
    save_model(model.eval(), out / "model")
    np.save(out / "valid.npy", corpus_bytes(corpus / "valid.jsonl.gz", 2**20))


def largest_group_size(model, wanted: int) -> int | None:
    """`wanted`, or the largest smaller supported group size that divides every quantized input dim."""
    widths = {m.in_features for n, m in model.named_modules() if n.endswith(QUANTIZED_LINEARS)}
    fitting = [g for g in SUPPORTED_GROUP_SIZES if g <= wanted and all(w % g == 0 for w in widths)]
    return max(fitting) if fitting else None


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="model directory (with --train-stand-in: the corpus directory)")
    parser.add_argument("valid_data", type=Path, help="held-out ids (with --train-stand-in: the output directory)")
    parser.add_argument("--train-stand-in", action="store_true", help="train the byte-level stand-in model instead")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the stand-in")
    parser.add_argument("--window", type=int, default=256, help="tokens per window (at most the model's max length)")
    parser.add_argument("--windows", type=int, default=64, help="number of windows scored")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--group-size",
        type=int,
        nargs="+",
        default=[128],
        help="INT4 group sizes to score (each falls back to the largest supported one that fits)",
    )
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    args = parser.parse_args(argv)
    if args.train_stand_in:
        train_stand_in(args.model_dir, args.valid_data, args.steps)
        return None

    reference = load_model(args.model_dir)
    length = min(args.window, reference.config.max_sequence_length)
    data = windows(load_tokens(args.valid_data), length, args.windows)
    groups = [largest_group_size(reference, wanted) for wanted in args.group_size]
    schemes = [QuantScheme(8), QuantScheme(4)] + [QuantScheme(4, g) for g in dict.fromkeys(groups) if g]
    rows = [("fp32", perplexity(reference, data, args.batch_size))]
    for scheme in schemes:
        rows.append(
            (scheme.name, perplexity(quantize_model(load_model(args.model_dir), scheme), data, args.batch_size))
        )
    base = rows[0][1]

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"### Quantization quality: {args.model_dir}",
        "",
        f"CPU ({platform.machine()}); torch {torch.__version__}; commit {commit}; {data.shape[0]} windows of "
        f"{length} tokens from {args.valid_data.name}; causal next-token perplexity",
        "",
        "| weights | perplexity | change vs fp32 | paper (GLM-130B, WikiText-2) |",
        "|---|---:|---:|---:|",
    ]
    for name, ppl in rows:
        change = "" if name == "fp32" else f"{100 * (ppl / base - 1):+.2f} %"
        lines.append(f"| {name} | {ppl:.3f} | {change} | {PAPER.get(name, '')} |")
    if None in groups:
        lines.append(f"| int4-group | n/a: no group size of {SUPPORTED_GROUP_SIZES} divides every layer's input | | |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with RESULTS.open("a") as f:
            f.write("\n" + table + "\n")
    return table


if __name__ == "__main__":
    main()
