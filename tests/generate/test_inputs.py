"""Positions and masks built from token ids follow SPEC.md section 5."""

import pytest
import torch

from glm130b import GLM
from glm130b.core.errors import InputError
from glm130b.generate.inputs import build_generation_batch, generation_context
from glm130b.tokenizer.specials import GLM130B_TOKENS
from tests.helpers import LONG_CONTEXT_TOKENS, ORACLE_TOKENS, load_fixture, oracle_config, valid_lengths

T = ORACLE_TOKENS


@pytest.mark.parametrize("case", ["sat_basic_fp32", "sat_padded_fp32", "sat04_glm130b_2d_fp32", "chatglm6b_stock_fp32"])
def test_builder_reproduces_the_reference_inputs(case):
    fixture = load_fixture(case)
    lengths = valid_lengths(fixture)
    sequences = [fixture["input_ids"][b, :n].tolist() for b, n in enumerate(lengths.tolist())]
    built = build_generation_batch(sequences, T, oracle_config(case).position_encoding)
    assert torch.equal(built.input_ids, fixture["input_ids"])
    assert torch.equal(built.position_ids, fixture["position_ids"])
    for b, n in enumerate(lengths.tolist()):  # rows of pad tokens are never read
        assert torch.equal(built.attention_mask[b, :, :n], fixture["attention_mask"][b, :, :n])


def test_builder_reproduces_the_reference_positions_at_the_end_of_the_context():
    """The 2048-token fixtures (their masks are not stored: test_mask_rule checks the rule)."""
    fixture = load_fixture("sat_long_context_fp32")
    built = build_generation_batch(
        fixture["input_ids"].long().tolist(), LONG_CONTEXT_TOKENS, max_sequence_length=2048, vocab_size=256
    )
    assert torch.equal(built.position_ids, fixture["position_ids"].long())


def test_gmask_positions_count_on_and_mask_positions_stay():
    g = build_generation_batch([[5, 6, T.gmask, T.sop, 7, 8]], T)
    assert g.position_ids.tolist() == [[0, 1, 2, 3, 4, 5]]
    m = build_generation_batch([[5, T.mask, 6, T.eos, T.sop, 7, 8]], T)
    assert m.position_ids.tolist() == [[0, 1, 2, 3, 1, 1, 1]]
    s = build_generation_batch([[T.smask, 6, T.eos, T.sop, 7]], T)
    assert s.position_ids.tolist() == [[0, 1, 2, 0, 0]]


def test_2d_positions():
    g = build_generation_batch([[5, 6, T.gmask, T.sop, 7, 8]], T, "2d")
    assert g.position_ids.tolist() == [[[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]]
    m = build_generation_batch([[5, T.mask, 6, T.eos, T.sop, 7]], T, "2d")
    assert m.position_ids.tolist() == [[[0, 1, 2, 3, 1, 1], [0, 0, 0, 0, 1, 2]]]


def test_the_mask_filled_follows_each_models_official_priority():
    """GLM-130B's generate.py fills [MASK] if there is one, else [sMASK], else [gMASK] (1-D);
    ChatGLM-6B's code takes [gMASK] if there is one, else [MASK] (2-D). The first mask of any kind
    is not the rule: here [gMASK] comes first and [MASK] is filled."""
    seq = [5, T.gmask, 6, T.mask, 7, T.eos, T.sop, 8, 9]
    assert build_generation_batch([seq], T).position_ids[0, 6:].tolist() == [3, 3, 3]
    assert build_generation_batch([seq], T, "2d").position_ids[0, 0, 6:].tolist() == [1, 1, 1]
    smask_first = [T.smask, 5, T.gmask, T.eos, T.sop, 8]
    assert build_generation_batch([smask_first], T).position_ids[0, 4:].tolist() == [0, 0]
    assert build_generation_batch([smask_first], T, "2d").position_ids[0, 0, 4:].tolist() == [2, 2]


def test_mask_rule():
    seq = [5, T.mask, 6, T.eos, T.sop, 7, 8]
    visible = ~build_generation_batch([seq], T).attention_mask[0, 0]
    context = 4
    assert visible[:, :context].all()  # everyone sees the whole context
    assert not visible[:context, context:].any()  # context never sees generated tokens
    gen = visible[context:, context:]
    assert torch.equal(gen, torch.ones_like(gen).tril())  # generated tokens are causal


def test_pad_keys_blocked_and_no_row_fully_blocked():
    batch = build_generation_batch([[5, T.gmask, T.sop, 7, 8], [T.gmask, T.sop]], T)
    mask = batch.attention_mask[1, 0]
    assert mask[:, 2:].logical_not().sum() == 3  # pad keys 2..4 are seen only by their own pad rows
    assert not mask[:2, 2:].logical_not().any()
    assert (~mask).any(dim=-1).all()
    assert batch.input_ids[1].tolist() == [T.gmask, T.sop, T.pad, T.pad, T.pad]


def test_generation_context_rules():
    t = GLM130B_TOKENS
    assert generation_context([1, 2, t.gmask], t) == [1, 2, t.gmask, t.sop]
    assert generation_context([1, t.mask, 2], t) == [1, t.mask, 2, t.eos, t.sop]
    assert generation_context([1, 2], t, default_mask=t.gmask) == [1, 2, t.gmask, t.sop]
    with pytest.raises(InputError, match=r"no \[MASK\], \[sMASK\] or \[gMASK\]"):
        generation_context([1, 2], t)


def test_builder_errors():
    with pytest.raises(InputError, match="no <sop>"):
        build_generation_batch([[1, T.gmask, 2]], T)
    with pytest.raises(InputError, match=r"no \[MASK\], \[sMASK\] or \[gMASK\]"):
        build_generation_batch([[1, 2, T.sop, 3]], T)
    with pytest.raises(InputError, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        build_generation_batch([[1, 1000, T.gmask, T.sop]], T, vocab_size=1000)
    with pytest.raises(InputError, match="sequence 1 has 7 tokens, more than max_sequence_length 6"):
        build_generation_batch([[T.gmask, T.sop], [1, 2, 3, T.gmask, T.sop, 4, 5]], T, max_sequence_length=6)
    # [MASK] spans keep their positions low, yet the sequence itself may not exceed the context
    # (issue #14: 211 tokens ran on a 128-token model)
    with pytest.raises(InputError, match="sequence 0 has 211 tokens, more than max_sequence_length 128"):
        build_generation_batch([[T.mask, T.eos, T.sop] + [7] * 208], T, max_sequence_length=128)
    assert build_generation_batch([[1, 2, T.gmask, T.sop, 4, 5]], T, max_sequence_length=6).lengths.tolist() == [6]


def test_model_input_errors(tiny_config):
    model = GLM(tiny_config).eval()
    batch = build_generation_batch([[5, 6, T.gmask, T.sop, 7]], T)
    ids, pos, mask = batch.input_ids, batch.position_ids, batch.attention_mask
    with pytest.raises(InputError, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        model(torch.tensor([[1, 1000, 2, 3, 4]]), pos, mask)
    with pytest.raises(InputError, match="position 128 exceeds max_sequence_length 128"):
        model(ids, pos + 124, mask)
    long = build_generation_batch([[T.mask, T.eos, T.sop] + [7] * 208], T)  # the span stays at position 0
    assert int(long.position_ids.max()) == 1
    with pytest.raises(InputError, match="the input has 211 tokens, more than max_sequence_length 128"):
        model(long.input_ids, long.position_ids, long.attention_mask)
    with pytest.raises(InputError, match="attention_mask must be bool"):
        model(ids, pos, mask.float())
    with pytest.raises(InputError, match=r"position_ids must have shape \(1, 5\)"):
        model(ids, pos.unsqueeze(1).repeat(1, 2, 1), mask)
    with pytest.raises(InputError, match=r"attention_mask must have shape \(1, 1, 5, 5\)"):
        model(ids, pos, mask[..., :4])
    with pytest.raises(InputError, match=r"input_ids must be \[batch, seq\]"):
        model(ids[0], pos, mask)
