"""Batches of the real GLM objective over random tokens, for the benchmarks: the sampler `glm130b
pretrain` draws from (GLMBatchSampler: the recipe's mix of [gMASK], [MASK] and MIP rows, padded to
the sequence length), over an in-memory corpus of random ids and random instruction pairs."""

from __future__ import annotations

import numpy as np

from glm130b.objective.sampler import GLMBatchSampler
from glm130b.objective.samples import MIPPair, ObjectiveConfig
from glm130b.tokenizer.specials import special_tokens_at

SPECIAL_SLOTS = 8  # the specials take the top 8 ids of the vocabulary (special_tokens_at)


class RandomCorpus:
    """One source of random ids below the specials; a window is a function of its start only."""

    sources = ["random"]
    weights = {"random": 1.0}

    def __init__(self, vocab_size: int, num_tokens: int = 1 << 24):
        self.vocab_size, self._num_tokens = vocab_size, num_tokens

    def num_tokens(self, source: str) -> int:
        return self._num_tokens

    def window(self, source: str, start: int, length: int) -> np.ndarray:
        return np.random.default_rng(start).integers(1, self.vocab_size - SPECIAL_SLOTS, length)


def objective_sampler(vocab_size: int, sequence_length: int, batch_size: int, seed: int = 0) -> GLMBatchSampler:
    """`micro_batch(i)` -> a TrainingBatch of `batch_size` rows drawn as in pretraining."""
    specials = special_tokens_at(vocab_size - SPECIAL_SLOTS, eos=vocab_size - 1, pad=0)
    objective = ObjectiveConfig.for_sequence_length(sequence_length)
    rng = np.random.default_rng(seed)
    top = vocab_size - SPECIAL_SLOTS
    segment = sequence_length // objective.mip_segments
    # instruction pairs of a few dozen to a few hundred tokens, every target fitting a segment
    pairs = [
        MIPPair(
            rng.integers(1, top, int(rng.integers(8, segment))),
            rng.integers(1, top, int(rng.integers(2, max(3, segment // 4)))),
        )
        for _ in range(64)
    ]
    return GLMBatchSampler(RandomCorpus(vocab_size), objective, specials, batch_size, seed, mip_pairs=pairs)
