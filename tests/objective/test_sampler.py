"""Micro-batches of the objective mix (glm130b.objective.sampler), checked by invariants over
thousands of rows: each row is taken apart by an independent parser (tests/objective/helpers.py:
segments from segment ids, blocks from <sop> tokens, masks from the token ids) that rebuilds the raw
text and checks every position, mask and loss rule; the mix shares against the recipe; determinism."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from glm130b.core.errors import ConfigError
from glm130b.objective.sampler import GLMBatchSampler
from glm130b.objective.samples import ObjectiveConfig
from tests.objective.helpers import (
    MIP_LENGTHS,
    SIGMAS,
    SOURCE_WEIGHTS,
    SPECIALS,
    FakeCorpus,
    analyse,
    make_pairs,
    parse_row,
)


# ---------------------------------------------------------------------- invariants
def test_every_rule_holds_over_thousands_of_rows(small):
    """analyse() ran the parser over all 3840 rows; this asserts all three kinds were exercised."""
    config, _, stats, _ = small
    assert len(stats["kinds"]) == 3840
    assert set(stats["kinds"]) == {"gmask", "mask", "mip"}


def test_every_rule_holds_at_the_recipe_length_in_both_encodings():
    config = ObjectiveConfig()
    pairs = make_pairs(MIP_LENGTHS)
    for encoding in ("1d", "2d"):
        sampler = GLMBatchSampler(
            FakeCorpus(), config, SPECIALS, batch_size=24, seed=7, mip_pairs=pairs, position_encoding=encoding
        )
        batches = [sampler.micro_batch(step) for step in range(2)]
        assert batches[0].position_ids.shape == ((24, 2, 2048) if encoding == "2d" else (24, 2048))
        stats = analyse(batches, config, encoding, pairs=sampler.mip_pairs)
        assert len(stats["kinds"]) == 48


@pytest.mark.parametrize("length", [32, 100, 777])
def test_every_rule_holds_at_odd_and_tiny_lengths(length):
    """for_sequence_length down to its minimum (8-token [MASK] segments) and at lengths that do
    not divide by 4 or 512."""
    config = ObjectiveConfig.for_sequence_length(length)
    sampler = GLMBatchSampler(
        FakeCorpus(), config, SPECIALS, batch_size=128, seed=length, mip_pairs=make_pairs([(5, 3), (40, 8)])
    )
    stats = analyse([sampler.micro_batch(0)], config, pairs=sampler.mip_pairs)
    assert set(stats["kinds"]) >= {"gmask", "mask"}


def test_dense_mask_matches_the_rule_rebuilt_from_tokens(small):
    """Expected mask from the tokens alone: same segment, and the key is before the segment's
    first <sop> or not after the query. Compared with the batch's compact-form dense mask."""
    _, _, _, batches = small
    batch = batches[0]
    blocked = batch.attention_mask()[:, 0].numpy()
    for b in range(batch.input_ids.shape[0]):
        ids, seg = batch.input_ids[b].numpy(), batch.segment_ids[b].numpy()
        L = len(ids)
        first_sop = np.zeros(L, int)
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            first_sop[where] = where[0] + np.argmax(ids[where] == SPECIALS.sop)
        q, k = np.arange(L)[:, None], np.arange(L)[None, :]
        visible = (seg[:, None] == seg[None, :]) & (seg[None, :] > 0) & ((k < first_sop[None, :]) | (k <= q))
        real = seg > 0
        assert (~blocked[b][real] == visible[real]).all()


def test_mip_pairs_too_long_are_left_out_with_a_warning():
    config = ObjectiveConfig.for_sequence_length(256)
    with pytest.warns(UserWarning, match="1 of 6 MIP pairs"):
        sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 4, 0, mip_pairs=make_pairs(MIP_LENGTHS))
    assert len(sampler.mip_pairs) == 5
    with pytest.raises(ConfigError, match="no MIP pair fits"), pytest.warns(UserWarning):
        GLMBatchSampler(FakeCorpus(), config, SPECIALS, 4, 0, mip_pairs=make_pairs([(1, 255)]))


def test_without_mip_pairs_the_mix_is_self_supervised_and_says_so():
    config = ObjectiveConfig.for_sequence_length(256)
    with pytest.warns(UserWarning, match="no MIP pairs"):
        sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 64, 3)
    stats = analyse([sampler.micro_batch(0)], config)
    assert "mip" not in set(stats["kinds"])


def test_corpus_too_small_is_refused():
    with pytest.raises(ConfigError, match="fewer than the 2048"):
        GLMBatchSampler(FakeCorpus(num_tokens=2047), ObjectiveConfig(), SPECIALS, 4, 0, mip_pairs=make_pairs([(3, 3)]))
    # [gMASK] only (the trainer's validation mix) reads 2000 tokens per row
    gmask_only = dataclasses.replace(ObjectiveConfig(), gmask_share=1.0, mip_share=0.0)
    GLMBatchSampler(FakeCorpus(num_tokens=2000), gmask_only, SPECIALS, 4, 0).micro_batch(0)
    with pytest.raises(ConfigError, match="fewer than the 2000"):
        GLMBatchSampler(FakeCorpus(num_tokens=1999), gmask_only, SPECIALS, 4, 0)


# ---------------------------------------------------------------------- statistics
def test_mix_shares_match_the_recipe(small):
    """Counts of each kind are binomial(N, p); 5 sigma = 5 sqrt(p (1-p) / N)."""
    config, _, stats, _ = small
    N = len(stats["kinds"])
    expected = {
        "mip": config.mip_share,
        "gmask": (1 - config.mip_share) * config.gmask_share,
        "mask": (1 - config.mip_share) * (1 - config.gmask_share),
    }
    for kind, p in expected.items():
        share = (stats["kinds"] == kind).mean()
        assert abs(share - p) <= SIGMAS * math.sqrt(p * (1 - p) / N), (kind, share, p)
    n_self = len(stats["sources"])
    books = (stats["sources"] == "books").mean()
    p = SOURCE_WEIGHTS["books"]
    assert abs(books - p) <= SIGMAS * math.sqrt(p * (1 - p) / n_self)


# ---------------------------------------------------------------------- determinism
def test_batches_depend_only_on_seed_and_step(small):
    config, sampler, _, batches = small
    twin = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 64, 1234, mip_pairs=sampler.mip_pairs)
    again = twin.micro_batch(17)
    for name in ("input_ids", "position_ids", "targets", "loss_mask", "segment_ids", "in_prefix"):
        assert torch.equal(getattr(again, name), getattr(batches[17], name))
    assert not torch.equal(twin.micro_batch(18).input_ids, batches[17].input_ids)
    other = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 64, 99, mip_pairs=sampler.mip_pairs)
    assert not torch.equal(other.micro_batch(17).input_ids, batches[17].input_ids)


def test_windows_name_the_text_each_row_was_cut_from(small):
    """windows(i) without building samples: a [gMASK] row's rebuilt text is its whole window, a
    [MASK] row's starts at its window's start and stays inside it, a MIP row has none."""
    config, sampler, _, batches = small
    for index in (0, 17, 59):
        windows = sampler.windows(index)
        assert len(windows) == sampler.batch_size
        for b, window in enumerate(windows):
            kind, facts = parse_row(batches[index], b, config, "1d")
            if kind == "mip":
                assert window is None
                continue
            text = facts[0][1] if kind == "gmask" else np.concatenate([f[1] for f in facts])
            expected = sampler.corpus.window(window.source, window.start, window.length)
            assert window.gmask == (kind == "gmask")
            assert (text == expected[: len(text)]).all()
            assert len(text) == window.length if kind == "gmask" else len(text) < window.length


def test_validation_batches_are_fixed_and_apart_from_training(small):
    config, sampler, _, batches = small
    first, second = sampler.validation_batches(2), sampler.validation_batches(2)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, second))
    assert not any(torch.equal(v.input_ids, t.input_ids) for v in first for t in batches)
    analyse(first, config, pairs=sampler.mip_pairs)


def test_sampler_arguments_are_checked():
    config = ObjectiveConfig.for_sequence_length(256)
    pairs = make_pairs([(3, 3)])
    for batch_size, seed, message in (
        (0, 0, "batch_size must be a positive integer"),
        (4, -1, "seed must be a non-negative integer"),
    ):
        with pytest.raises(ConfigError, match=message):
            GLMBatchSampler(FakeCorpus(), config, SPECIALS, batch_size, seed, mip_pairs=pairs)
    sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 2, 0, mip_pairs=pairs)
    with pytest.raises(ConfigError, match="micro-batch index must be a non-negative integer, got -1"):
        sampler.micro_batch(-1)
    assert torch.equal(sampler.micro_batch(np.int64(3)).input_ids, sampler.micro_batch(3).input_ids)
