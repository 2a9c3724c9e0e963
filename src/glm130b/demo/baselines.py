"""What the demo model must beat: unigram and bigram models fitted on the training tokens the model
read (covered_text), scored on exactly the validation targets the model is scored on, in bits per
byte (comparable across languages and tokenizers: a byte of text costs the same whatever the
vocabulary)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from glm130b.objective.batch import TrainingBatch
from glm130b.objective.sampler import Window


@dataclass(frozen=True)
class ScoredTargets:
    """The validation targets of a language, with the text token before each (the bigram's context)."""

    targets: np.ndarray
    previous: np.ndarray

    @classmethod
    def of(cls, batches: list[TrainingBatch], sop: int) -> ScoredTargets:
        """Scored positions of [gMASK] suffix batches: the input there is the previous text token,
        except at <sop> (which predicts the first target), laid out `... x [gMASK] <sop> t1 ...`,
        where it is x, two positions back."""
        targets, previous = [], []
        for batch in batches:
            rows, cols = (batch.loss_mask > 0).nonzero(as_tuple=True)
            inputs = batch.input_ids[rows, cols]
            back = batch.input_ids[rows, (cols - 2).clamp(min=0)]
            previous.append(np.where(inputs.numpy() == sop, back.numpy(), inputs.numpy()))
            targets.append(batch.targets[rows, cols].numpy())
        return cls(np.concatenate(targets), np.concatenate(previous))

    def bytes(self, byte_lengths: list[int]) -> int:
        """UTF-8 bytes of the targets' text (Tokenizer.byte_lengths)."""
        return int(np.asarray(byte_lengths)[self.targets].sum())


class NgramBaselines:
    """Unigram (add-one smoothing over the vocabulary) and bigram (Witten-Bell interpolation with
    that unigram: the weight of a context's own counts is c(prev) / (c(prev) + distinct successors))
    models of token streams."""

    def __init__(self, streams: list[np.ndarray], vocab_size: int):
        self.vocab_size = vocab_size
        counts = np.zeros(vocab_size, np.int64)
        pairs = []
        for stream in streams:
            stream = np.asarray(stream, np.int64)
            counts += np.bincount(stream, minlength=vocab_size)[:vocab_size]
            pairs.append(stream[:-1] * vocab_size + stream[1:])
        self.unigram_log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
        self.pair_keys, self.pair_counts = np.unique(np.concatenate(pairs), return_counts=True)
        contexts = self.pair_keys // vocab_size
        self.context_counts = np.bincount(contexts, weights=self.pair_counts, minlength=vocab_size)
        self.context_types = np.bincount(contexts, minlength=vocab_size)

    def unigram_nats(self, scored: ScoredTargets) -> float:
        """Total negative log-likelihood of the targets."""
        return float(-self.unigram_log_p[scored.targets].sum())

    def bigram_nats(self, scored: ScoredTargets) -> float:
        keys = scored.previous * self.vocab_size + scored.targets
        at = np.searchsorted(self.pair_keys, keys).clip(max=len(self.pair_keys) - 1)
        pair = np.where(self.pair_keys[at] == keys, self.pair_counts[at], 0)
        seen = self.context_counts[scored.previous]
        types = self.context_types[scored.previous]
        weight = np.divide(seen, seen + types, out=np.zeros_like(seen, dtype=float), where=seen > 0)
        own = np.divide(pair, seen, out=np.zeros_like(seen, dtype=float), where=seen > 0)
        p = weight * own + (1 - weight) * np.exp(self.unigram_log_p[scored.targets])
        return float(-np.log(p).sum())


def covered_text(corpus, windows: Iterable[Window]) -> dict[str, list[np.ndarray]]:
    """Per source, the text that `windows` cover, each token once: overlapping and touching
    windows merge into one stretch, so a bigram never spans a gap the model did not read."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for window in windows:
        spans.setdefault(window.source, []).append((window.start, window.start + window.length))
    text = {}
    for source, intervals in spans.items():
        merged: list[list[int]] = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        text[source] = [np.asarray(corpus.window(source, start, end - start), np.int64) for start, end in merged]
    return text


def bits_per_byte(nats: float, num_bytes: int) -> float:
    return nats / math.log(2) / num_bytes
