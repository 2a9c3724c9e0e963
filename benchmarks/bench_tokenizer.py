"""Tokenization throughput (MB/s of UTF-8 text, English and Chinese) of our BilingualTokenizer.

Measured in the same run on the same model and texts:
- baseline: a plain single-process loop, `sentencepiece.SentencePieceProcessor.encode(text)` per document;
- ours, one by one: `Tokenizer.encode(text)` per document (the wrapper's own overhead);
- ours, batched: `Tokenizer.encode_batch(texts)`, which hands the whole list to SentencePiece's
  C++ encoder with `num_threads` = all cores (threads, no worker processes, no pickling); also
  with 1 thread, to separate the saving on per-call overhead from the gain of the threads.
Each figure is the best of `--repeats` runs. Without `--tokenizer` it first trains one with the
defaults of `glm130b tokenizer train` on the corpus and reports that time too.

    python benchmarks/bench_tokenizer.py [--corpus ../shared/data/corpus/train.jsonl.gz] [--mb 4]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

from glm130b.tokenizer.tokenizers import Tokenizer, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "train.jsonl.gz"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def texts_by_language(corpus: Path, megabytes: float) -> dict[str, list[str]]:
    """The first documents of each language, up to `megabytes` of UTF-8 each."""
    budget = megabytes * 1e6
    texts: dict[str, list[str]] = {"en": [], "zh": []}
    sizes = dict.fromkeys(texts, 0)
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            lang = record["lang"]
            if lang in texts and sizes[lang] < budget:
                texts[lang].append(record["text"])
                sizes[lang] += len(record["text"].encode())
            if all(size >= budget for size in sizes.values()):
                break
    return texts


def best_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(tokenizer: Tokenizer, sp: spm.SentencePieceProcessor, texts: list[str], repeats: int) -> dict[str, float]:
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    plain = [t for t in texts if "\u2581" not in t]  # (a literal U+2581 is where ours differs on purpose)
    assert tokenizer.encode_batch(plain) == [sp.encode(t) for t in plain]  # the same ids on every path
    all_threads = tokenizer.num_threads

    def batch(threads: int) -> None:
        tokenizer.num_threads = threads
        tokenizer.encode_batch(texts)
        tokenizer.num_threads = all_threads

    runs = {
        "baseline: SentencePiece loop, 1 process": lambda: [sp.encode(t) for t in texts],
        "ours: encode() loop": lambda: [tokenizer.encode(t) for t in texts],
        "ours: encode_batch(), 1 thread": lambda: batch(1),
        f"ours: encode_batch(), {all_threads} threads": lambda: batch(all_threads),
    }
    return {name: megabytes / best_seconds(run, repeats) for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokenizer", type=Path, help="a saved tokenizer folder (default: train one)")
    parser.add_argument("--mb", type=float, default=4.0, help="MB of text per language")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    args = parser.parse_args()

    lines = ["## Tokenizer throughput (benchmarks/bench_tokenizer.py)", ""]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines.append(
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared: load average "
        f"{os.getloadavg()[0]:.1f} at the start); torch {torch.__version__}, sentencepiece "
        f"{spm.__version__}; commit {commit}; corpus {args.corpus.name}."
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.tokenizer or Path(tmp)
        if args.tokenizer is None:
            start = time.perf_counter()
            train_tokenizer([args.corpus], folder)
            seconds = time.perf_counter() - start
            lines.append(f"Training with the defaults of `glm130b tokenizer train`: {seconds:.0f} s wall.")
        tokenizer = load_tokenizer(folder)
        sp = spm.SentencePieceProcessor(model_file=str(folder / tokenizer.model_file))
    lines += ["", "| text | path | MB/s |", "|---|---|---|"]
    for lang, texts in texts_by_language(args.corpus, args.mb).items():
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        for name, rate in measure(tokenizer, sp, texts, args.repeats).items():
            lines.append(f"| {lang}, {len(texts)} docs, {megabytes:.1f} MB | {name} | {rate:.2f} |")
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
