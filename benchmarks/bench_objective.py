"""Sample-building throughput of the GLM objective on this machine.

  python benchmarks/bench_objective.py        # prints a Markdown table; --append adds it to RESULTS.md

Baseline (measured in the same run): the official collator's way of building a [MASK] sequence,
with the same span rule as ours: Python lists filled token by token, and a dense [L, L] bool mask
per sample (np.tril per segment, prefix columns opened). Against it: glm130b.objective.samples.mask_sample
(vectorised numpy, compact attention form), the same plus the dense mask materialised from the
compact form, and the whole GLMBatchSampler (mix, corpus windows, padding into a TrainingBatch).
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from glm130b.objective.sampler import GLMBatchSampler, collate
from glm130b.objective.samples import MIPPair, ObjectiveConfig, mask_sample, span_length_cdf
from glm130b.tokenizer.specials import SpecialTokens

SPECIALS = SpecialTokens()
# Dense masks are built per micro-batch of this many rows: [8, 2048, 2048] index temporaries
# already take ~270 MB (glm130b.model.masks.dense_attention_mask gathers int64 segment ids per pair).
DENSE_MICRO_BATCH = 8


class ArangeCorpus:
    """Two sources of consecutive ids; window reads cost what slicing an mmap'd array costs."""

    sources = ["en", "zh"]
    weights = {"en": 0.5, "zh": 0.5}

    def __init__(self, num_tokens: int = 1_000_000):
        self.tokens = np.arange(num_tokens, dtype=np.int64) + 20_000

    def num_tokens(self, source: str) -> int:
        return len(self.tokens)

    def window(self, source: str, start: int, length: int) -> np.ndarray:
        return self.tokens[start : start + length]


def naive_mask_sequence(raw: np.ndarray, rng: np.random.Generator, config: ObjectiveConfig):
    """The baseline: one [MASK] sequence token by token in Python, with its dense mask."""
    S, L = config.mask_segment_length, config.sequence_length
    cdf = list(span_length_cdf(config.poisson_lambda, config.max_span_length))
    ids, targets, positions, loss = [], [], [], []
    blocked = np.ones((L, L), dtype=bool)
    start = 0
    for _ in range(config.mask_segments):
        lengths = []
        while True:
            lengths.append(bisect.bisect_right(cdf, rng.random()) + 1)
            if sum(lengths) >= math.ceil(config.mask_ratio * (S - 2 * len(lengths)) - 1e-9):
                break
        chunk = [int(t) for t in raw[start : start + S - 2 * len(lengths)]]
        start += len(chunk)
        rng.shuffle(lengths)
        spare = len(chunk) - sum(lengths) - (len(lengths) - 1)
        offsets = sorted(int(rng.integers(0, spare + 1)) for _ in lengths)
        span_at, shift = {}, 0
        for offset, length in zip(offsets, lengths):
            span_at[offset + shift] = length
            shift += length + 1
        seg_start = len(ids)
        context, spans, i = [], [], 0
        while i < len(chunk):
            if i in span_at:
                spans.append((len(context), chunk[i : i + span_at[i]]))
                context.append(SPECIALS.mask)
                i += span_at[i]
            else:
                context.append(chunk[i])
                i += 1
        for p, token in enumerate(context):
            ids.append(token)
            targets.append(token)
            positions.append(p)
            loss.append(0)
        for j in rng.permutation(len(spans)):
            mask_pos, span = spans[j]
            for token_in, token_out in zip([SPECIALS.sop] + span, span + [SPECIALS.eop]):
                ids.append(token_in)
                targets.append(token_out)
                positions.append(mask_pos)
                loss.append(1)
        end = len(ids)
        blocked[seg_start:end, seg_start:end] = ~np.tril(np.ones((end - seg_start,) * 2, dtype=bool))
        blocked[seg_start:end, seg_start : seg_start + len(context)] = False
    return ids, targets, positions, loss, blocked


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def best_rate(fn, count: int, repeats: int = 3) -> float:
    """Samples per second of the fastest of `repeats` runs of fn() (which builds `count` samples)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def length_rows(length: int, n: int) -> list[tuple]:
    """The benchmark's rows for one sequence length (closures bound to this length's data)."""
    rows = []
    config = ObjectiveConfig.for_sequence_length(length)
    raw = np.arange(config.mask_window_length, dtype=np.int64) + 20_000

    def baseline():
        rng = np.random.default_rng(0)
        for _ in range(n):
            naive_mask_sequence(raw, rng, config)

    def compact():
        rng = np.random.default_rng(0)
        for _ in range(n):
            mask_sample(raw, rng, config, SPECIALS)

    def compact_then_dense():
        rng = np.random.default_rng(0)
        for _ in range(0, n, DENSE_MICRO_BATCH):
            samples = [mask_sample(raw, rng, config, SPECIALS) for _ in range(DENSE_MICRO_BATCH)]
            collate(samples, length, SPECIALS.pad).attention_mask()

    pairs = [MIPPair(np.arange(100) + 20_000, np.arange(30) + 30_000)]
    sampler = GLMBatchSampler(ArangeCorpus(), config, SPECIALS, batch_size=n, seed=0, mip_pairs=pairs)
    base = best_rate(baseline, n)
    for name, fn in (
        ("[MASK] sequence, baseline: per-token Python + dense mask", baseline),
        ("[MASK] sequence, mask_sample (compact form)", compact),
        ("[MASK] sequence, mask_sample + collate + dense mask", compact_then_dense),
        ("full mix, GLMBatchSampler.micro_batch (TrainingBatch)", lambda: sampler.micro_batch(0)),
    ):
        rate = base if fn is baseline else best_rate(fn, n)
        rows.append((length, name, f"{rate:,.0f}", f"{rate * length / 1e6:.2f}", f"{rate / base:.1f}x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--samples", type=int, default=128, help="a multiple of 8")
    args = parser.parse_args()
    n = args.samples
    rows = []
    for length in (2048, 512):
        rows += length_rows(length, n)

    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    commit = git("rev-parse", "--short", "HEAD").strip()
    if git("--no-optional-locks", "status", "--porcelain", "--", "src", "benchmarks"):  # read-only
        commit += " + uncommitted changes"
    lines = [
        "## Objective: sample-building throughput (benchmarks/bench_objective.py)",
        "",
        f"Machine: {cpu_name()}, CPU, 2 cores (shared), {torch.get_num_threads()} torch threads, "
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, commit {commit}; "
        f"load average {os.getloadavg()[0]:.1f} at the end (other jobs share the cores); "
        f"{n} samples per measurement, best of 3. Baseline: the official collator's approach, per-token "
        f"Python lists and a dense [L, L] mask per sample, with our span rule.",
        "",
        "| L | builder | samples/s | M tokens/s | vs baseline |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.append:
        results = Path(__file__).parent / "RESULTS.md"
        existing = results.read_text() if results.exists() else "# Benchmark results\n"
        results.write_text(existing.rstrip("\n") + "\n\n" + table)


if __name__ == "__main__":
    main()
