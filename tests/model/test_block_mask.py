"""The FlexAttention block mask (glm130b.model.block_mask) against the dense mask, on batches of
the three kinds of GLM sample."""

import warnings

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

from glm130b.model.block_mask import flex_block_mask
from glm130b.objective.sampler import collate
from glm130b.objective.samples import ObjectiveConfig, gmask_sample, mask_sample, mip_sample
from tests.objective.helpers import SPECIALS, make_pairs


def test_flex_block_mask_matches_the_dense_mask():
    """flex_attention with the block mask equals SDPA with the dense mask on every real row, and
    blocks between the 128-token segments of a [MASK] row are skipped entirely."""
    config = ObjectiveConfig.for_sequence_length(512)
    rng = np.random.default_rng(5)
    raw = np.arange(config.mask_window_length) + 10
    samples = [
        mask_sample(raw, rng, config, SPECIALS),
        gmask_sample(raw[: config.gmask_raw_length], rng, config, SPECIALS),
        mip_sample(make_pairs([(50, 20), (300, 40)]), rng, config, SPECIALS),
    ]
    batch = collate(samples, config.sequence_length, SPECIALS.pad)
    block_mask = flex_block_mask(batch.segment_ids, batch.in_prefix)
    tiles = block_mask.to_dense()[0, 0]  # [4, 4] blocks of the [MASK] row: segments are blocks
    assert torch.equal(tiles.bool(), torch.eye(4, dtype=torch.bool))
    q, k, v = torch.randn(3, 3, 2, config.sequence_length, 16).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        flex = flex_attention(q, k, v, block_mask=block_mask)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~batch.attention_mask())
    real = batch.segment_ids > 0
    torch.testing.assert_close(flex.transpose(1, 2)[real], dense.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
