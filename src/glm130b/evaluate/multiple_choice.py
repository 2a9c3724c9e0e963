"""`mul` tasks (SPEC.md section 9): every item packed once (glm130b.evaluate.packing), each choice
scored by its summed log-prob, the prediction the best choice (the first on ties); accuracy and
micro-averaged precision, recall and F1.

As the official code does: if every choice of the FILE is one token, one <sop> serves them all;
each context keeps its last `max_seq_length - sum(choice lengths) - 2` tokens. Scoring variants
(`scoring` in the task config) divide by the token or byte count, or subtract the choice's
log-prob after an empty context (calibration, one extra packed pass per distinct choice set).
"""

from __future__ import annotations

import numpy as np

from glm130b.evaluate.config import TaskConfig
from glm130b.evaluate.items import Item, TaskDataError, TaskFile
from glm130b.evaluate.metrics import MICRO_RATIOS, micro_counts
from glm130b.evaluate.packing import ScoredSequence, SpanScore, pack_choices, score_batch
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.scores import FileOutcome, UnitScores


def truncated_context(item: Item, config: TaskConfig, limit: int, path) -> list[int]:
    """The official rule: keep the last `limit - choice tokens - 2` context tokens (a set of
    one-token choices counts 1: they share one <sop>)."""
    needed = sum(len(c) for c in item.choices)
    if needed == len(item.choices):
        needed = 1
    if needed >= limit - 1:
        raise TaskDataError(
            f"{path}: item {item.index}: its choices take {needed} tokens, but the context window "
            f"(max_seq_length) is {limit}; shorten the choices or raise max_seq_length"
        )
    keep = limit - needed - 2
    return item.context[-keep:] if len(item.context) + needed + 2 > limit else item.context


def item_sequences(items: list[Item], config: TaskConfig, specials, limit: int, path) -> list[ScoredSequence]:
    single = all(len(c) == 1 for item in items for c in item.choices)
    return [
        pack_choices(
            truncated_context(item, config, limit, path),
            item.choices,
            specials,
            gmask=config.use_task_mask,
            single_token=single,
            multitask_encoding=config.use_multitask_encoding,
            causal_context=config.unidirectional,
        )
        for item in items
    ]


def choice_scores(
    item: Item, spans: list[SpanScore], scoring: str, empty_context: list[SpanScore] | None
) -> list[float]:
    if scoring == "token_mean":
        return [s.log_prob / s.tokens for s in spans]
    if scoring == "byte_mean":
        return [s.log_prob / max(1, len(t.encode("utf-8"))) for s, t in zip(spans, item.choice_texts)]
    if scoring == "calibrated":
        return [s.log_prob - e.log_prob for s, e in zip(spans, empty_context)]
    return [s.log_prob for s in spans]


def score_choices(
    task_file: TaskFile, config: TaskConfig, model, tokenizer, executor: Executor
) -> list[tuple[list[SpanScore], list[float]]]:
    """Per item: each choice's summed log-prob (and token count), and its score under `config.scoring`."""
    specials = tokenizer.specials
    limit = min(config.max_seq_length, model.config.max_sequence_length)
    items = task_file.items
    run = lambda batch: score_batch(model, batch, specials.pad)
    spans = executor.map(
        item_sequences(items, config, specials, limit, task_file.path),
        run,
        config.micro_batch_size,
        length=lambda s: len(s.tokens),
        desc=f"{config.name} {task_file.path.name}",
    )
    empty = {}
    if config.scoring == "calibrated":  # log P(choice | empty context), once per distinct choice set
        sets = sorted({tuple(map(tuple, item.choices)) for item in items})
        blanks = [Item(-1, [], "", choices=[list(c) for c in s]) for s in sets]
        empty = dict(
            zip(
                sets,
                executor.map(
                    item_sequences(blanks, config, specials, limit, task_file.path),
                    run,
                    config.micro_batch_size,
                    length=lambda s: len(s.tokens),
                ),
            )
        )
    return [
        (item_spans, choice_scores(item, item_spans, config.scoring, empty.get(tuple(map(tuple, item.choices)))))
        for item, item_spans in zip(items, spans)
    ]


def item_record(item: Item, spans: list[SpanScore], scores: list[float]) -> dict:
    """An item's record in the results; its prediction is the best choice, the first on ties (as the
    official code)."""
    return {
        "index": item.index,
        **item.meta,
        "label": item.label,
        "prediction": int(np.argmax(scores)),
        "log_probs": [s.log_prob for s in spans],
        "scores": scores,
    }


def classification_scores(labels: list[int], predictions: list[int], metrics: list[str]) -> dict[str, UnitScores]:
    """Accuracy and the micro-averaged precision, recall and F1, each item a unit (its own counts)."""
    out = {}
    for metric in metrics:
        if metric == "Accuracy":
            parts = [(float(y == p), 1.0) for y, p in zip(labels, predictions)]
        else:
            parts = [MICRO_RATIOS[metric](*micro_counts([y], [p])) for y, p in zip(labels, predictions)]
        out[metric] = UnitScores("mean100", [float(n) for n, _ in parts], [float(d) for _, d in parts])
    return out


def evaluate_file(task_file: TaskFile, config: TaskConfig, model, tokenizer, executor: Executor) -> FileOutcome:
    scored = score_choices(task_file, config, model, tokenizer, executor)
    records = [item_record(item, spans, scores) for item, (spans, scores) in zip(task_file.items, scored)]
    labels, predictions = [r["label"] for r in records], [r["prediction"] for r in records]
    return FileOutcome(records, classification_scores(labels, predictions, config.metric_names))
