"""The demo's blank-infilling test: held-out sentences with one word replaced by [MASK] (an English
word; a two-character Chinese word of People's Daily's own segmentation). The model's fill is its
top-1 among the training split's most frequent words of that kind, each scored by its
log-probability in the blank (packed, one forward per sentence: glm130b.evaluate.packing), and
for comparison, on the first items, its top-1 reading each completed sentence left to right after
[gMASK]; the unigram guess is the most frequent of them, written into every blank."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from glm130b.core.errors import InputError
from glm130b.evaluate.packing import pack_choices, score_batch
from glm130b.generate.prompts import parse_prompt

ENGLISH_WORD = re.compile(r"[A-Za-z]+")
CHINESE_WORD = re.compile(r"[\u4e00-\u9fff]{2}")  # two CJK unified ideographs
SENTENCE_END = frozenset("。！？")
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Held-out lines of 5-14 words / sentences of 6-40 words: context enough to narrow a blank, and a
# prompt well inside the demo's 128-token sequences.
ENGLISH_WORDS_PER_LINE = (5, 14)
CHINESE_WORDS_PER_SENTENCE = (6, 40)
# The verdict is a ratio of two small rates: at 200 items the unigram guess's ~5 % is known to only
# +-1.5 points (binomial sd), a third of itself; at 1,000 to +-0.7. Chinese has ~675 held-out
# sentences in the window, and takes them all.
ITEMS_PER_LANGUAGE = 1000
# The left-to-right comparison scores each choice with the rest of the sentence (~8x the tokens of
# a [MASK] fill): the first 200 items keep it within ~40 s on 2 cores.
LEFT_TO_RIGHT_ITEMS = 200
# The choices of every blank: the training split's most frequent words of the kind (~2 tokens
# each, so a sentence and its choices stay within 512 positions).
CANDIDATES = 100
SCORING_BATCH = 16  # packed sentences per forward


@dataclass(frozen=True)
class FillItem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class FillScore:
    items: int
    model_rate: float  # the [MASK] fill
    left_to_right_rate: float  # the same choices read left to right after [gMASK], first items only
    left_to_right_items: int
    unigram_rate: float
    unigram_guess: str
    candidates: int  # words each blank chooses from
    covered: float  # share of items whose answer is among them: the most either can get right
    examples: list[tuple[str, str, str]]  # (prompt, answer, model's [MASK] fill)
    left_to_right_fills: list[str]  # of the first left_to_right_items items


def read_jsonl_field(paths: Iterable[Path], field: str) -> Iterator:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)[field]


def english_lines(texts: Iterable[str]) -> Iterator[list[str]]:
    """Lines of verse, or sentences of prose (a line cut after . ! ?), as whitespace-separated
    tokens; speaker names (all capitals) and stage directions are left out by the length window
    and the capitals test."""
    low, high = ENGLISH_WORDS_PER_LINE
    for text in texts:
        for line in text.splitlines():
            for sentence in SENTENCE_BREAK.split(line):
                tokens = sentence.split()
                if low <= len(tokens) <= high and not sentence.isupper():
                    yield tokens


def chinese_sentences(documents: Iterable[list[str]]) -> Iterator[list[str]]:
    """Sentences (split after 。！？) of segmented documents, as words."""
    low, high = CHINESE_WORDS_PER_SENTENCE
    for words in documents:
        sentence: list[str] = []
        for word in words:
            sentence.append(word)
            if word in SENTENCE_END:
                if low <= len(sentence) <= high:
                    yield sentence
                sentence = []


def english_items(lines: list[list[str]], count: int, seed: int) -> list[FillItem]:
    """One blank per line, at a word (letters only, never the first) drawn uniformly: the blank
    takes the space before it, as SentencePiece's "\u2581word" pieces do."""
    rng = random.Random(seed)
    items = []
    for tokens in rng.sample(lines, len(lines)):
        choices = [i for i, t in enumerate(tokens) if i > 0 and ENGLISH_WORD.fullmatch(t)]
        if choices:
            i = rng.choice(choices)
            after = " ".join(tokens[i + 1 :])
            items.append(FillItem(" ".join(tokens[:i]) + "[MASK]" + (" " + after if after else ""), tokens[i]))
        if len(items) == count:
            break
    return items


def chinese_items(sentences: list[list[str]], count: int, seed: int) -> list[FillItem]:
    rng = random.Random(seed)
    items = []
    for words in rng.sample(sentences, len(sentences)):
        choices = [i for i, w in enumerate(words) if CHINESE_WORD.fullmatch(w)]
        if choices:
            i = rng.choice(choices)
            items.append(FillItem("".join(words[:i]) + "[MASK]" + "".join(words[i + 1 :]), words[i]))
        if len(items) == count:
            break
    return items


def english_words(lines: Iterable[list[str]]) -> Counter:
    """Counts of the words a blank can hold (letters only, never a line's first)."""
    return Counter(t for tokens in lines for t in tokens[1:] if ENGLISH_WORD.fullmatch(t))


def chinese_words(sentences: Iterable[list[str]]) -> Counter:
    return Counter(w for words in sentences for w in words if CHINESE_WORD.fullmatch(w))


def _choice_groups(context: int, choices: list[list[int]], limit: int) -> list[range]:
    """Consecutive runs of choices that each fit one packed sequence of at most `limit` tokens
    (the context, then each choice behind its <sop>)."""
    groups, start, used = [], 0, context
    for i, choice in enumerate(choices):
        if used + len(choice) > limit and i > start:
            groups.append(range(start, i))
            start, used = i, context
        used += len(choice)
    return groups + [range(start, len(choices))]


def _log_probs(
    model, tokenizer, contexts: list[list[int]], choices: list[list[list[int]]], gmask: bool
) -> list[list[float]]:
    """Per item, the summed log-probability of each of its choices after its context's mask,
    scored as the evaluation toolkit scores multiple choice: the choices packed behind the context,
    as many per sequence as the model's positions hold."""
    limit = model.config.max_sequence_length
    sequences, owners = [], []  # owners: (item, first choice) of each packed sequence
    for index, (context, item_choices) in enumerate(zip(contexts, choices)):
        for group in _choice_groups(len(context), item_choices, limit):
            group_ids = [item_choices[i] for i in group]
            sequences.append(pack_choices(context, group_ids, tokenizer.specials, gmask=gmask, single_token=False))
            owners.append((index, group.start))
    log_probs = [[0.0] * len(item_choices) for item_choices in choices]
    for start in range(0, len(sequences), SCORING_BATCH):
        batch = sequences[start : start + SCORING_BATCH]
        for (index, first), spans in zip(owners[start:], score_batch(model, batch, tokenizer.specials.pad)):
            for offset, span in enumerate(spans):
                log_probs[index][first + offset] = span.log_prob
    return log_probs


def score_fills(
    model, tokenizer, items: list[FillItem], counts: Counter, separator: str, left_to_right_items: int
) -> FillScore:
    """Each blank's fill: the candidate (the CANDIDATES most frequent words of `counts`, each
    written as `separator + word`, the text the blank replaced) with the highest summed
    log-probability in the [MASK] blank. The [MASK] sentence ends without the eos that
    parse_prompt appends (GLM-130B's generate.py marks a prompt's end so): a held-out line is not
    the end of a document, and the demo's model met eos only there (an English document is a whole
    play), so eos put the blank out of its training distribution (English fills 9.3 % -> 10.5 %
    without it, 1,000 items, seed 1234; docs/training.md). The left-to-right fill, of the first
    `left_to_right_items` items, reads the same choices without [MASK]: the sentence up to the
    blank, then [gMASK], then the choice and the rest of the sentence scored as the continuation
    (the choice whose completed sentence the model finds most probable). A sentence too long for
    the context with its longest choice is left out (none at the demo's 512 positions)."""
    candidates = [word for word, _ in counts.most_common(CANDIDATES)]
    choice_ids = [tokenizer.encode(separator + word) for word in candidates]
    limit = model.config.max_sequence_length
    halves = [item.prompt.split("[MASK]") for item in items]
    blank_contexts = [tokenizer.encode_prompt(item.prompt) for item in items]
    prefix_contexts = [parse_prompt(left + "[gMASK]", tokenizer).context for left, _ in halves]
    continuations = [[tokenizer.encode(separator + word + right) for word in candidates] for _, right in halves]
    longest = max(map(len, choice_ids))
    kept = [  # the rest cannot be scored
        i
        for i in range(len(items))
        if len(blank_contexts[i]) + longest <= limit
        and len(prefix_contexts[i]) + max(map(len, continuations[i])) <= limit
    ]
    if not kept:
        raise InputError(f"no fill sentence fits the model's {limit} positions with its longest choice")
    items = [items[i] for i in kept]
    compared = kept[:left_to_right_items]
    blank_scores = _log_probs(model, tokenizer, [blank_contexts[i] for i in kept], [choice_ids] * len(kept), False)
    prefix_scores = _log_probs(
        model, tokenizer, [prefix_contexts[i] for i in compared], [continuations[i] for i in compared], True
    )

    def best(row: list[float]) -> str:
        return candidates[max(range(len(candidates)), key=row.__getitem__)]

    fills = [best(row) for row in blank_scores]
    left_to_right = [best(row) for row in prefix_scores]

    def rate(chosen: list[str]) -> float:
        return sum(fill == item.answer for fill, item in zip(chosen, items)) / len(chosen)

    n = len(items)
    guessed = sum(item.answer == candidates[0] for item in items)
    covered = sum(item.answer in set(candidates) for item in items)
    examples = [(item.prompt, item.answer, fill) for item, fill in zip(items, fills)]
    return FillScore(
        n,
        rate(fills),
        rate(left_to_right),
        len(left_to_right),
        guessed / n,
        candidates[0],
        len(candidates),
        covered / n,
        examples,
        left_to_right,
    )
