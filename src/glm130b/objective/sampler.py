"""Training micro-batches of the GLM objective drawn from a corpus, deterministic in (seed, index).

Each row has its own numpy Generator seeded from (seed, stream, index, row), so a resumed run sees
the same micro-batches, and validation (its own stream) the same windows every time. A row picks its
kind, then a source by the corpus weights and a window of it, and builds its sample
(glm130b.objective.samples). The corpus is duck-typed (glm130b.data.corpus.TokenCorpus is one):
`sources`, `weights` (summing to 1), `num_tokens(source)`, `window(source, start, length)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from glm130b.core.config_io import check_field, check_positive_int
from glm130b.core.errors import ConfigError
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.samples import MIPPair, ObjectiveConfig, Sample, gmask_sample, mask_sample, mip_sample
from glm130b.tokenizer.specials import SpecialTokens

TRAIN_STREAM, VALIDATION_STREAM = 0, 1


class Window(NamedTuple):
    """The stretch of a source that one row is cut from."""

    source: str
    start: int
    length: int
    gmask: bool  # a [gMASK] row (else a [MASK] row)


class GLMBatchSampler:
    """`micro_batch(index)` -> TrainingBatch of batch_size rows of the objective mix, padded to the
    configured sequence length. `mip_pairs`: (prompt ids, target ids) pairs (load_mip_pairs);
    pairs whose target cannot fit a segment are left out with a warning."""

    def __init__(
        self,
        corpus: Any,
        objective_config: ObjectiveConfig,
        specials: SpecialTokens,
        batch_size: int,
        seed: int,
        mip_pairs: Sequence[MIPPair] | None = None,
        position_encoding: str = "1d",
    ):
        if position_encoding not in ("1d", "2d"):
            raise ConfigError(f"position_encoding must be '1d' or '2d', got {position_encoding!r}")
        check_positive_int("batch_size", batch_size)
        check_field("seed", seed, int, lambda v: v >= 0, "a non-negative integer")
        self.corpus, self.config, self.specials = corpus, objective_config, specials
        self.batch_size, self.seed, self.position_encoding = batch_size, seed, position_encoding
        self.mip_pairs = self._fitting_pairs(mip_pairs)
        self.mip_share = objective_config.mip_share if self.mip_pairs else 0.0
        self.sources = list(corpus.sources)
        self.source_weights = np.array([corpus.weights.get(s, 0.0) for s in self.sources], float)
        if not self.sources or self.source_weights.sum() <= 0:
            raise ConfigError("the corpus has no source with a positive weight; give it data to sample")
        self.source_weights /= self.source_weights.sum()
        window_lengths = []
        if objective_config.gmask_share > 0:
            window_lengths.append(objective_config.gmask_raw_length)  # [gMASK] rows
        if objective_config.gmask_share < 1:
            window_lengths.append(objective_config.mask_window_length)  # [MASK] rows
        needed = max(window_lengths)
        for source, weight in zip(self.sources, self.source_weights):
            if weight > 0 and corpus.num_tokens(source) < needed:
                raise ConfigError(
                    f"source {source!r} holds {corpus.num_tokens(source)} tokens, fewer than "
                    f"the {needed} one sample reads; add data or give it weight 0"
                )

    def _fitting_pairs(self, pairs: Sequence[MIPPair] | None) -> list[MIPPair]:
        config = self.config
        if pairs is None:
            if config.mip_share > 0:
                warnings.warn(
                    f"no MIP pairs given: training the self-supervised mix only instead of "
                    f"{config.mip_share:.0%} MIP; pass mip_pairs (load_mip_pairs) or set mip_share=0",
                    stacklevel=3,
                )
            return []
        pairs = [MIPPair(np.asarray(p, np.int64), np.asarray(t, np.int64)) for p, t in pairs]
        # [MASK] and <sop> come on top of the target (its <eop> is a target, not an input).
        fitting = [p for p in pairs if len(p.target) + 2 <= config.mip_segment_length]
        if len(fitting) < len(pairs):
            warnings.warn(
                f"{len(pairs) - len(fitting)} of {len(pairs)} MIP pairs have targets longer than "
                f"a {config.mip_segment_length}-token segment allows and are left out "
                f"(targets are never truncated); use fewer mip_segments to keep them",
                stacklevel=3,
            )
        if not fitting and config.mip_share > 0:
            raise ConfigError(
                "no MIP pair fits a segment; shorten the targets, use fewer mip_segments or set mip_share=0"
            )
        return fitting

    # ------------------------------------------------------------------ drawing
    def _window(self, rng: np.random.Generator) -> Window | None:
        """A row's first draws: its kind, then its source and window (None for a MIP row)."""
        config = self.config
        if rng.random() < self.mip_share:
            return None
        gmask = rng.random() < config.gmask_share
        length = config.gmask_raw_length if gmask else config.mask_window_length
        source = self.sources[int(rng.choice(len(self.sources), p=self.source_weights))]
        start = int(rng.integers(0, self.corpus.num_tokens(source) - length + 1))
        return Window(source, start, length, gmask)

    def sample(self, rng: np.random.Generator) -> Sample:
        """One row: its kind, then its source and window, then the sample."""
        window = self._window(rng)
        if window is None:
            return mip_sample(self.mip_pairs, rng, self.config, self.specials)
        raw = np.asarray(self.corpus.window(window.source, window.start, window.length), np.int64)
        build = gmask_sample if window.gmask else mask_sample
        return build(raw, rng, self.config, self.specials)

    def _row_rng(self, stream: int, index: int, row: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(stream, index, row)))

    def _batch(self, stream: int, index: int) -> TrainingBatch:
        rows = [self.sample(self._row_rng(stream, index, row)) for row in range(self.batch_size)]
        return collate(rows, self.config.sequence_length, self.specials.pad, self.position_encoding)

    def windows(self, index: int) -> list[Window | None]:
        """The corpus windows that the rows of training micro-batch `index` are cut from (None for
        a MIP row), without building the samples: what the model read in that micro-batch. A
        [MASK] row leaves the tail of its window unused (mask_sample), a few tokens."""
        return [self._window(self._row_rng(TRAIN_STREAM, index, row)) for row in range(self.batch_size)]

    def micro_batch(self, index: int) -> TrainingBatch:
        """Training micro-batch number `index`: a function of (seed, index) only."""
        index = int(index) if isinstance(index, np.integer) else index
        check_field("micro-batch index", index, int, lambda v: v >= 0, "a non-negative integer")
        return self._batch(TRAIN_STREAM, index)

    def validation_batches(self, num_batches: int) -> list[TrainingBatch]:
        """A fixed set of batches (the same on every call), drawn apart from the training stream.
        Hold out data by giving the validation sampler a held-out corpus."""
        return [self._batch(VALIDATION_STREAM, i) for i in range(num_batches)]


def collate(
    samples: Sequence[Sample], sequence_length: int, pad_id: int, position_encoding: str = "1d"
) -> TrainingBatch:
    """Right-pad samples to sequence_length (pad id, segment 0, no loss, position 0) and stack."""
    B, L = len(samples), sequence_length
    ids = np.full((B, L), pad_id, np.int64)
    targets = np.full((B, L), pad_id, np.int64)
    loss = np.zeros((B, L), np.float32)
    segments = np.zeros((B, L), np.int64)
    prefix = np.zeros((B, L), bool)
    positions = np.zeros((B, 2, L) if position_encoding == "2d" else (B, L), np.int64)
    for b, s in enumerate(samples):
        n = len(s)
        ids[b, :n], targets[b, :n], loss[b, :n] = s.input_ids, s.targets, s.loss_mask
        segments[b, :n], prefix[b, :n] = s.segment_ids, s.in_prefix
        positions[b, ..., :n] = s.position_ids(position_encoding)
    return TrainingBatch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(positions),
        targets=torch.from_numpy(targets),
        loss_mask=torch.from_numpy(loss),
        segment_ids=torch.from_numpy(segments),
        in_prefix=torch.from_numpy(prefix),
    )
