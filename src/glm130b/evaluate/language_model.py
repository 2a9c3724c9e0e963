"""`lm` tasks (SPEC.md section 9): word perplexity and bits per byte over sliding windows.

Window i starts at `i * generation_length` and holds up to `max_seq_length - 1` tokens; window 0
scores all of them, a later one uses its first `max_seq_length - 1 - generation_length` tokens
as an unscored bidirectional prompt and scores the rest, so every token is scored once
(`unidirectional`: the prompt is read causally). Each window's NLL is a unit of the bootstrap,
the file's words and bytes shared out to windows by their scored tokens. The Pile protocol does
this per document and reports bits per byte per subset (`meta.pile_set_name`) and pooled.
"""

from __future__ import annotations

import math

from glm130b.evaluate.config import TaskConfig
from glm130b.evaluate.items import TaskFile
from glm130b.evaluate.metrics import word_count
from glm130b.evaluate.packing import ScoredSequence, pack_window, score_batch
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.scores import FileOutcome, UnitScores


def window_count(num_tokens: int, limit: int, stride: int) -> int:
    """The official count: one window, plus one per stride of tokens beyond the first window."""
    return max(math.ceil(max(num_tokens - (limit - 1), 0) / stride) + 1, 1)


def windows(
    tokens: list[int],
    limit: int,
    stride: int,
    specials,
    gmask: bool = True,
    causal_context: bool = False,
    max_windows: int | None = None,
) -> list[ScoredSequence]:
    count = window_count(len(tokens), limit, stride)
    out = []
    for i in range(count if max_windows is None else min(count, max_windows)):
        part = tokens[i * stride : i * stride + limit - 1]
        cut = 0 if i == 0 else limit - 1 - stride
        out.append(pack_window(part[:cut], part[cut:], specials, gmask=gmask, causal_context=causal_context))
    return out


def evaluate_file(
    task_file: TaskFile, config: TaskConfig, model, tokenizer, executor: Executor, max_windows: int | None = None
) -> FileOutcome:
    specials = tokenizer.specials
    limit = min(config.max_seq_length, model.config.max_sequence_length)
    sequences = windows(
        task_file.tokens,
        limit,
        config.generation_length,
        specials,
        config.use_task_mask,
        config.unidirectional,
        max_windows,
    )
    spans = executor.map(
        sequences,
        lambda batch: score_batch(model, batch, specials.pad),
        config.micro_batch_size,
        length=lambda s: len(s.tokens),
        desc=f"{config.name} {task_file.path.name}",
    )
    nll = [-span.log_prob for [span] in spans]
    scored = [span.tokens for [span] in spans]
    # A partial run (max_windows) counts the words and bytes of the text it scored, in proportion.
    share = sum(scored) / len(task_file.tokens)
    words = word_count(task_file.text) * share
    n_bytes = len(task_file.text.encode("utf-8")) * share
    records = [{"window": i, "nll": loss, "tokens": n} for i, (loss, n) in enumerate(zip(nll, scored))]
    total = sum(scored)
    scores = {
        "PPL": UnitScores("ppl", nll, [words * n / total for n in scored]),
        "BPB": UnitScores("bpb", nll, [n_bytes * n / total for n in scored]),
    }
    return FileOutcome(records, {m: scores[m] for m in config.metric_names})


def evaluate_documents(task_file: TaskFile, config: TaskConfig, model, tokenizer, executor: Executor) -> FileOutcome:
    """The Pile: every document windowed on its own; BPB pooled and per subset."""
    specials = tokenizer.specials
    limit = min(config.max_seq_length, model.config.max_sequence_length)
    sequences, owners = [], []
    for d, item in enumerate(task_file.items):
        for seq in windows(
            item.context, limit, config.generation_length, specials, config.use_task_mask, config.unidirectional
        ):
            sequences.append(seq)
            owners.append(d)
    spans = executor.map(
        sequences,
        lambda batch: score_batch(model, batch, specials.pad),
        config.micro_batch_size,
        length=lambda s: len(s.tokens),
        desc=f"{config.name} {task_file.path.name}",
    )
    records, by_subset = [], {}
    for d, [span] in zip(owners, spans):
        item = task_file.items[d]
        n_bytes = len(item.text.encode("utf-8")) * span.tokens / len(item.context)
        records.append(
            {
                "document": item.index,
                "subset": item.meta["subset"],
                "nll": -span.log_prob,
                "tokens": span.tokens,
                "bytes": n_bytes,
            }
        )
        by_subset.setdefault(item.meta["subset"], []).append(records[-1])
    scores = {"BPB": UnitScores("bpb", [r["nll"] for r in records], [r["bytes"] for r in records])}
    breakdown = {
        name: {"BPB": UnitScores("bpb", [r["nll"] for r in rs], [r["bytes"] for r in rs])}
        for name, rs in sorted(by_subset.items())
    }
    return FileOutcome(records, scores, breakdown)
