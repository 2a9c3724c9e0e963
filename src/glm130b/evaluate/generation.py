"""`gen` tasks (SPEC.md section 9) on the generation engine (glm130b.generate.decode): contexts
built and cut as the official code builds them, greedy or beam search with its options, EM / F1
against every reference; LAMBADA's protocol; and LAMBADA's log-likelihood variant.

Contexts: `text + [M, sop]` with a bidirectional context, or `[gMASK, sop] + text` all causal
when `unidirectional`; each keeps its last `max_seq_length - max_gen_length - 2` tokens. Nothing
is banned from generation unless the protocol says so (the official evaluation bans nothing).
"""

from __future__ import annotations

import string

from glm130b.core.errors import ConfigError
from glm130b.evaluate.config import TaskConfig
from glm130b.evaluate.items import Item, TaskFile
from glm130b.evaluate.metrics import best_over_references, exact_match, stripped_match, token_f1
from glm130b.evaluate.packing import pack_choices, score_batch
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.scores import FileOutcome, UnitScores
from glm130b.generate.decode import generate_ids
from glm130b.generate.strategies import BeamSearch, Greedy, Strategy

# The official batches pad prompts to a multiple of 32 tokens, and its beam search counts that
# padding in the length penalty; reproduced so that beam choices match.
REFERENCE_PAD_MULTIPLE = 32
# LAMBADA on GLM-130B's icetk vocabulary bans these too ("'" and "``" pieces; the official task.py).
ICETK_LAMBADA_INVALID = (20068, 146010, 146337)
ICETK_LAMBADA_PREFIXES = ((46010,), (146337,))


def generation_context(item: Item, config: TaskConfig, specials, limit: int) -> list[int]:
    keep = limit - config.max_gen_length - 2
    if keep < 1:
        raise ConfigError(
            f"{config.source or config.name}: max_gen_length {config.max_gen_length} leaves no room for "
            f"a context in {limit} tokens; lower max_gen_length"
        )
    text = item.context[-keep:] if len(item.context) + config.max_gen_length + 2 > limit else item.context
    mask = specials.gmask if config.use_task_mask else specials.mask
    if mask in text:  # blank filling: the mask written in the input is the one to fill
        return text + [specials.sop]
    return [mask, specials.sop] + text if config.unidirectional else text + [mask, specials.sop]


def strategy_for(config: TaskConfig, banned_prefixes: tuple = ()) -> Strategy:
    """The official BaseStrategy of evaluation is top-k 1 (greedy); its beam search is deterministic."""
    if config.sampling_strategy == "BaseStrategy":
        return Greedy()
    return BeamSearch(
        num_beams=config.num_beams,
        length_penalty=config.length_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        min_length=config.min_gen_length,
        prompt_length_multiple=REFERENCE_PAD_MULTIPLE,
        reference_stop=True,
        banned_prefixes=banned_prefixes,
    )


def lambada_bans(tokenizer, vocab_size: int) -> tuple[list[int], tuple]:
    """Punctuation: its one-token forms are banned everywhere, every form as the first tokens."""
    invalid, prefixes = [], []
    if getattr(tokenizer, "kind", None) == "icetk":
        invalid += ICETK_LAMBADA_INVALID
        prefixes += ICETK_LAMBADA_PREFIXES
    for mark in string.punctuation:
        ids = tokenizer.encode(mark)
        if len(ids) == 1:
            invalid.append(ids[0])
        prefixes.append(tuple(ids))
    return sorted({i for i in invalid if i < vocab_size}), tuple(p for p in prefixes if p and max(p) < vocab_size)


def first_word(tokens: list[int], tokenizer) -> str:
    """The official first word: the decoded text stripped, cut at the first space, encoded and decoded."""
    return tokenizer.decode(tokenizer.encode(tokenizer.decode(tokens).strip().split(" ")[0]))


def lambada_prediction(hypotheses: list[list[int]], tokenizer) -> str:
    """The first word of the first hypothesis whose second word is punctuation, else of the best.
    `in string.punctuation` is a substring test, as in the official code ("" and ".," pass too)."""
    for tokens in hypotheses:
        words = tokenizer.decode(tokens).strip().split(" ")
        if len(words) >= 2 and words[1] in string.punctuation:
            return first_word(tokens, tokenizer)
    return first_word(hypotheses[0], tokenizer)


def evaluate_file(task_file: TaskFile, config: TaskConfig, model, tokenizer, executor: Executor) -> FileOutcome:
    if config.protocol == "lambada_loglikelihood":
        return evaluate_loglikelihood_file(task_file, config, model, tokenizer, executor)
    specials = tokenizer.specials
    limit = min(config.max_seq_length, model.config.max_sequence_length)
    banned, prefixes = lambada_bans(tokenizer, model.config.vocab_size) if config.protocol == "lambada" else ([], ())
    strategy = strategy_for(config, prefixes)
    run = lambda batch: generate_ids(
        model, batch, specials, strategy, config.max_gen_length, banned=banned, all_hypotheses=True
    )
    contexts = [generation_context(item, config, specials, limit) for item in task_file.items]
    outputs = executor.map(contexts, run, config.micro_batch_size, desc=f"{config.name} {task_file.path.name}")
    records, per_metric = [], {m: [] for m in config.metric_names}
    for item, hypotheses in zip(task_file.items, outputs):
        references = [tokenizer.decode(t) for t in item.targets]
        if config.protocol == "lambada":
            prediction = lambada_prediction(hypotheses, tokenizer)
        else:
            prediction = tokenizer.decode(hypotheses[0])
        record = {"index": item.index, **item.meta, "prediction": prediction, "references": references}
        for metric in config.metric_names:
            rule = {"EM": exact_match, "F1": token_f1}.get(metric, stripped_match)
            record[metric] = best_over_references(rule, prediction, references)
            per_metric[metric].append(record[metric])
        records.append(record)
    return FileOutcome(records, {m: UnitScores("mean100", v, [1.0] * len(v)) for m, v in per_metric.items()})


def evaluate_loglikelihood_file(
    task_file: TaskFile, config: TaskConfig, model, tokenizer, executor: Executor
) -> FileOutcome:
    """The target's log-likelihood after `context + [gMASK]` (bidirectional context, the target a
    causal block counting on from the mask); right when every target token is the most likely one
    (lm-evaluation-harness's lambada_openai rule)."""
    specials = tokenizer.specials
    limit = min(config.max_seq_length, model.config.max_sequence_length)
    sequences = []
    for item in task_file.items:
        target = item.targets[0]
        context = item.context[-(limit - len(target) - 2) :]
        sequences.append(
            pack_choices(
                context, [target], specials, gmask=True, single_token=False, causal_context=config.unidirectional
            )
        )
    spans = executor.map(
        sequences,
        lambda batch: score_batch(model, batch, specials.pad),
        config.micro_batch_size,
        length=lambda s: len(s.tokens),
        desc=f"{config.name} {task_file.path.name}",
    )
    records, greedy = [], []
    for item, [span] in zip(task_file.items, spans):
        greedy.append(float(span.greedy))
        records.append(
            {"index": item.index, **item.meta, "log_prob": span.log_prob, "tokens": span.tokens, "greedy": span.greedy}
        )
    return FileOutcome(records, {"Accuracy": UnitScores("mean100", greedy, [1.0] * len(greedy))})
