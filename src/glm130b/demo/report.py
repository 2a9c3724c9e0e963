"""REPORT.md of `glm130b demo`: what was trained, and the evidence that it learned."""

from __future__ import annotations

import statistics
from pathlib import Path

from glm130b.data.demo_corpus import DemoCorpus
from glm130b.demo.infilling import FillScore
from glm130b.train.config import TrainConfig
from glm130b.train.metrics import read_metrics
from glm130b.train.pretrain import PretrainResult
from glm130b.train.report import markdown_table, write_report

FILL_EXAMPLES = 5  # per language


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def write_demo_report(
    path: Path,
    config: TrainConfig,
    result: PretrainResult,
    scores: dict,
    fills: dict[str, FillScore],
    quantized: dict[str, dict[str, float]],
    samples: list[tuple[str, str, str]],
    curve: Path | None,
    timings: dict[str, float],
    corpus: DemoCorpus,
    parameters: int,
    new_tokens: int,
) -> Path:
    """`scores`: {language: glm130b.demo.pipeline.LanguageScores}; `quantized`: {weights: {language:
    bits per byte}}; `samples`: (prompt, strategy, output)."""
    train = read_metrics(result.metrics_dir, "train")
    interventions = read_metrics(result.metrics_dir, "intervention")
    glm = config.model_config()
    objective = config.objective_config()
    trained = train[-1]["samples"] if train else 0
    positions = trained * config.sequence_length
    stopped = (
        f" (stopped at the time limit of {config.time_limit_s:.0f} s, the schedule run by the clock)"
        if result.stopped_early
        else ""
    )
    sections = [
        (
            "Run",
            f"""
Model: {glm.num_layers} layers, hidden {glm.hidden_size}, {glm.num_attention_heads} heads, FFN {glm.inner_hidden_size},
vocabulary {glm.vocab_size} (our bilingual tokenizer), sequence length {config.sequence_length}:
{parameters:,} parameters ({parameters - glm.vocab_size * glm.hidden_size:,} outside the tied embedding).
Training: {train[-1]["step"] if train else 0} steps, {trained} of {config.train_samples} sequences{stopped} ({positions:,} token
positions, {positions / parameters:.1f} per parameter), precision {config.precision}, seed {config.seed}, the
GLM-130B objective ({objective.gmask_share:.0%} [gMASK] with suffixes of
{objective.suffix_fraction_min:.0%}-{objective.suffix_fraction_max:.0%} of the window; the rest [MASK], {objective.mask_ratio:.0%}
of the tokens in spans of 1-{objective.max_span_length}) and recipe (AdamW, warmup + cosine, batch ramp-up
{config.rampup_start_batch_size} -> {config.global_batch_size}, embedding gradient shrink alpha
{config.embedding_grad_scale}, DeepNorm init). Sizing arithmetic: configs/demo.yaml.
Spike-guard interventions: {len(interventions)}.
Median throughput: {statistics.median(r["tokens_per_s"] for r in train) if train else 0:,.0f} token positions/s.

Checkpoint (model directory, loadable with `glm130b.checkpoint.load_model`): `{result.model_dir}`
Training checkpoints: `{Path(config.out_dir) / "checkpoints"}`; metrics: `{result.metrics_dir}`.
""",
        ),
        ("Loss curve", f"![loss curve]({curve.name})" if curve else "matplotlib is not installed: no PNG."),
        (
            "Did it learn? Bits per byte on held-out text",
            f"""
The suffixes of [gMASK] samples of the held-out split ({config.eval_batches} batches of
{config.micro_batch_size} per language), scored by the model and by a unigram (add-one) and a bigram
(Witten-Bell, interpolated with the unigram) model fitted on the same training tokens: the text of
that language the model read (every window its kept updates were cut from, each token once), on
exactly the same targets. Bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes of
the targets' text: lower is better, and comparable across languages and vocabularies. For scale,
the last column is a bigram fitted on the whole training split, most of which the model never saw.

{
                markdown_table(
                    [
                        "language",
                        "model",
                        "bigram",
                        "unigram",
                        "model beats both",
                        "target tokens",
                        "target bytes",
                        "tokens fitted on (of the split)",
                        "bigram, whole split",
                    ],
                    [
                        [
                            lang,
                            f"{s.model:.3f}",
                            f"{s.bigram:.3f}",
                            f"{s.unigram:.3f}",
                            _yes(s.beats_baselines),
                            s.target_tokens,
                            s.target_bytes,
                            f"{s.fitted_tokens:,} ({s.fitted_tokens / s.split_tokens:.0%})",
                            f"{s.bigram_whole_split:.3f}",
                        ]
                        for lang, s in scores.items()
                    ],
                )
            }
""",
        ),
    ]
    if fills:
        rows = [
            [
                lang,
                f.items,
                f"{f.covered:.1%}",
                f"{f.model_rate:.1%}",
                f"{f.left_to_right_rate:.1%} of {f.left_to_right_items}",
                f"{f.unigram_rate:.1%} ({f.unigram_guess})",
                f"{f.model_rate / f.unigram_rate:.1f}x" if f.unigram_rate else "-",
                _yes(f.model_rate >= 2 * f.unigram_rate and f.model_rate > 0),
            ]
            for lang, f in fills.items()
        ]
        examples = "\n".join(
            f"- `{prompt}` -> `{fill}` (answer `{answer}`)"
            for f in fills.values()
            for prompt, answer, fill in f.examples[:FILL_EXAMPLES]
        )
        sections.append(
            (
                "Blank infilling on held-out sentences",
                f"""
One word replaced by [MASK] in held-out lines (English: a word of letters; Chinese: a two-character
word of People's Daily's segmentation). Both fill every blank from the same choices, the training
split's {next(iter(fills.values())).candidates} most frequent words of that kind: the model with the one of highest
log-probability in the blank (scored as glm130b evaluate scores multiple choice), the unigram guess
with the most frequent. Top-1 exact match; "answer among the choices" bounds both rates. The ratio
and the verdict judge the [MASK] fill; for comparison, the next column fills the first blanks
without [MASK]: the sentence up to the blank, [gMASK], then each choice with the rest of the
sentence scored as the continuation (the completed sentence the model finds most probable).

{markdown_table(["language", "items", "answer among the choices", "model ([MASK])", "model, left to right ([gMASK])", "unigram guess", "ratio", "model >= 2x"], rows)}

The first fills of each language:

{examples}
""",
            )
        )
    languages = sorted(next(iter(quantized.values())))
    sections.append(
        (
            "Quantization (weight-only absmax, no calibration): bits per byte",
            markdown_table(
                ["weights"] + languages,
                [[name] + [f"{values[lang]:.3f}" for lang in languages] for name, values in quantized.items()],
            ),
        )
    )
    body = "\n\n".join(
        f"Prompt: `{prompt}` ({strategy})\n\n> {output.replace(chr(10), ' ')}" for prompt, strategy, output in samples
    )
    sections.append((f"Samples from the fp32 model (up to {new_tokens} new tokens)", body))
    sections.append(("Time", markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])))
    licenses = corpus.record.get("licenses", {})
    if licenses:
        sections.append(
            (
                "Data",
                "\n".join(f"- {name}: {info.get('text')} ({info.get('package')})" for name, info in licenses.items()),
            )
        )
    return write_report(path, "glm130b demo", sections)
