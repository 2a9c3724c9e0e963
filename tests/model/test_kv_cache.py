"""Incremental decoding with the KV cache gives the logits of the full forward."""

import pytest
import torch

from glm130b import GLM, KVCache
from glm130b.core.errors import InputError
from glm130b.generate.inputs import build_generation_batch
from tests.helpers import ORACLE_TOKENS, load_fixture, oracle_model

T = ORACLE_TOKENS
GMASK_SEQ = [11, 12, 13, 14, 15, 16, T.gmask, T.sop, 21, 22, 23, 24, 25, 26, 27]
MASK_SEQ = [31, 32, 33, 34, T.mask, 35, 36, 37, 38, T.eos, T.sop, 41, 42, 43]
SHORT_SEQ = [51, T.mask, 52, T.eos, T.sop, 61, 62]


def full_and_incremental(model, sequences, steps, two_d=False):
    """Logits of one full forward, and of prefill + the given step sizes over a KV cache."""
    inputs = build_generation_batch(sequences, T, "2d" if two_d else "1d")
    with torch.no_grad():
        full = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        # prefill up to and including the last <sop>: every context must be complete
        start = int(max(s.index(T.sop) for s in sequences)) + 1
        cache = KVCache(model.config, len(sequences), inputs.input_ids.shape[1])
        chunks = [model(*_args(inputs.step(0, start)), kv_cache=cache)]
        for size in steps:
            end = min(start + size, inputs.input_ids.shape[1])
            if start == end:
                break
            chunks.append(model(*_args(inputs.step(start, end)), kv_cache=cache))
            start = end
    return inputs, full, torch.cat(chunks, dim=1)


def _args(inputs):
    return inputs.input_ids, inputs.position_ids, inputs.attention_mask


def assert_equal_on_valid(inputs, full, incremental):
    assert incremental.shape == full.shape
    for b, n in enumerate(inputs.lengths.tolist()):
        torch.testing.assert_close(incremental[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "reference", "auto"])  # auto: a dense mask runs sdpa
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("sequence", [GMASK_SEQ, MASK_SEQ], ids=["gmask", "mask"])
def test_cache_equals_full_forward(sequence, step, backend):
    model = oracle_model("sat_basic_fp32", attention_backend=backend)
    inputs, full, incremental = full_and_incremental(model, [sequence], [step] * 20)
    assert_equal_on_valid(inputs, full, incremental)


@pytest.mark.parametrize("case", ["sat04_glm130b_2d_fp32", "chatglm6b_stock_fp32"])
def test_cache_equals_full_forward_2d(case):
    model = oracle_model(case)
    inputs, full, incremental = full_and_incremental(model, [GMASK_SEQ, MASK_SEQ], [1, 2, 5], two_d=True)
    assert_equal_on_valid(inputs, full, incremental)


def test_cache_with_padded_batch_of_mixed_masks():
    model = oracle_model("sat_padded_fp32")
    inputs, full, incremental = full_and_incremental(model, [GMASK_SEQ, MASK_SEQ, SHORT_SEQ], [1] * 20)
    assert_equal_on_valid(inputs, full, incremental)


def test_reorder_follows_the_parent_row():
    """After reordering the cache to [1, 1], both rows continue sequence 1 exactly."""
    model = oracle_model("sat_basic_fp32")
    sequences = [GMASK_SEQ[:10], MASK_SEQ[:13]]
    inputs = build_generation_batch(sequences, T)
    start = 11  # after MASK_SEQ's <sop>; GMASK_SEQ[:10] has fewer tokens, padded
    with torch.no_grad():
        cache = KVCache(model.config, 2, 14)
        model(*_args(inputs.step(0, start)), kv_cache=cache)
        cache.reorder(torch.tensor([1, 1]))
        step = inputs.step(start, 13)
        ids, pos, mask = (t[[1, 1]] for t in _args(step))
        logits = model(ids, pos, mask, kv_cache=cache)
        alone = build_generation_batch([sequences[1]], T)
        expected = model(*_args(alone))[0, start:13]
    torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], expected, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error(tiny_config):
    model = GLM(tiny_config).eval()
    inputs = build_generation_batch([GMASK_SEQ], T)
    cache = KVCache(tiny_config, 1, 8)
    with pytest.raises(InputError, match="KV cache holds 8 tokens"):
        model(*_args(inputs.step(0, 9)), kv_cache=cache)


def test_cache_longer_than_context_window_is_an_error(tiny_config):
    with pytest.raises(InputError, match="exceeds max_sequence_length 128"):
        KVCache(tiny_config, 1, 129)


def test_cache_mask_must_cover_cached_keys(tiny_config):
    model = GLM(tiny_config).eval()
    inputs = build_generation_batch([GMASK_SEQ], T)
    cache = KVCache(tiny_config, 1, 16)
    with torch.no_grad():
        model(*_args(inputs.step(0, 8)), kv_cache=cache)
    step = inputs.step(8, 9)
    with pytest.raises(InputError, match=r"\[batch, 1, new tokens, cached \+ new\]"):
        model(step.input_ids, step.position_ids, step.attention_mask[..., 8:], kv_cache=cache)


def test_logits_at_gives_the_full_forwards_rows():
    fixture = load_fixture("sat_padded_fp32")
    model = oracle_model("sat_padded_fp32")
    last = fixture["lengths"] - 1
    with torch.no_grad():
        full = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
        picked = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"], logits_at=last)
    assert picked.shape == (full.shape[0], 1, full.shape[2])
    # one row through the head is a matrix-vector product: its sums round differently (|logits| ~65)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(full.shape[0]), last], atol=1e-4, rtol=0)
