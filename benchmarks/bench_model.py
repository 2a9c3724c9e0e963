"""Model construction and forward speed on this machine.

  python benchmarks/bench_model.py            # prints a Markdown table; --append adds it to RESULTS.md

- building the glm-130b preset on the meta device (goal: under a second)
- a glm-10m forward over a batch of [gMASK] sequences with the SDPA backend, against the
  reference arithmetic (the official class's path) measured in the same run
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import torch

from glm130b import GLM, GLMConfig
from glm130b.generate.inputs import build_generation_batch
from glm130b.tokenizer.specials import SpecialTokens


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    def build_meta():
        with torch.device("meta"):
            return GLM(GLMConfig.from_preset("glm-130b"))

    build_s = best_of(build_meta, 3)
    rows = [("build glm-130b on meta (128.7 B params)", f"{build_s * 1000:.0f} ms", "")]

    torch.manual_seed(0)
    context = args.seq // 2
    config = GLMConfig.from_preset("glm-10m")
    # the 8 specials at the top of the demo vocabulary, as a trained demo tokenizer lays them out
    tokens = SpecialTokens(mask=16000, gmask=16001, smask=16002, sop=16004, eop=16005, eos=2, pad=0)
    sequence = list(range(100, 100 + context - 1)) + [tokens.gmask, tokens.sop]
    sequence += list(range(200, 200 + args.seq - len(sequence)))
    inputs = build_generation_batch([sequence] * args.batch, tokens)
    num_tokens = args.batch * args.seq
    timings = {}
    for backend in ("reference", "sdpa"):
        model = GLM(GLMConfig(**{**config.to_dict(), "attention_backend": backend})).eval()
        with torch.no_grad():
            forward = lambda model=model: model(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
            forward()
            timings[backend] = best_of(forward, 5)
    for backend, seconds in timings.items():
        speedup = "baseline" if backend == "reference" else f"{timings['reference'] / seconds:.2f}x"
        rows.append(
            (f"glm-10m forward, {backend}, {args.batch}x{args.seq}", f"{num_tokens / seconds:,.0f} tokens/s", speedup)
        )

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = (
        f"## Model build and forward (bench_model.py)\n\n{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, commit {commit}\n\n"
        "| what | figure | vs baseline |\n|---|---|---|\n"
    )
    table = header + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    print(table)
    if args.append:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
