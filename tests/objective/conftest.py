"""Fixtures of the objective tests: the statistics sample drawn by the sampler."""

import warnings

import pytest

from glm130b.objective.sampler import GLMBatchSampler
from glm130b.objective.samples import ObjectiveConfig
from tests.objective.helpers import MIP_LENGTHS, SPECIALS, FakeCorpus, analyse, make_pairs


@pytest.fixture(scope="session")
def small():
    """3840 rows at sequence length 256 (64 rows x 60 steps): the statistics sample, drawn once per
    test process for the sample and the sampler tests."""
    config = ObjectiveConfig.for_sequence_length(256)
    pairs = make_pairs(MIP_LENGTHS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (2, 300) does not fit: checked in its own test
        sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, batch_size=64, seed=1234, mip_pairs=pairs)
    batches = [sampler.micro_batch(step) for step in range(60)]
    return config, sampler, analyse(batches, config, pairs=sampler.mip_pairs), batches
