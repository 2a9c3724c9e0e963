"""Every attention backend, through the whole model, against the reference arithmetic (the official
step-by-step attention on the dense mask), on logits and on the gradient of every parameter, on a
batch of the real objective: [MASK] rows of three segments, [gMASK] rows, a MIP row of two
segments, padding. The backends take the compact mask, as the trainer gives it.

Tolerance, fp64 on CPU: 1e-6 of the largest value. The reference takes its softmax in fp32 even
here (the official arithmetic), which puts it ~3e-8 from every fp64 backend; its -10000 fill
underflows to exactly 0. The same comparison with a wrong mask (plain causal: 0.09; none: 2.1)
misses by more than 1e-2, ten thousand times the tolerance: the check bites.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm130b import GLM, GLMConfig
from glm130b.core.errors import ConfigError, InputError
from glm130b.model import prefix_attention
from glm130b.model.attention import describe_backend, resolve_backend
from glm130b.model.kv_cache import KVCache
from glm130b.model.masks import CompactMask
from glm130b.objective.loss import masked_lm_loss
from glm130b.objective.sampler import collate
from glm130b.objective.samples import ObjectiveConfig, gmask_sample, mask_sample, mip_sample
from tests.objective.helpers import SPECIALS, make_pairs

VOCAB, LENGTH = 256, 96
TOLERANCE = 1e-6
WRONG_BY_AT_LEAST = 1e-2
BACKENDS = {  # name: GLMConfig fields
    "sdpa": dict(attention_backend="sdpa"),
    "auto": dict(attention_backend="auto"),  # the prefix-LM loop on a CPU
    "prefix loop": dict(attention_backend="prefix", prefix_kernel="loop"),
    "prefix varlen": dict(attention_backend="prefix", prefix_kernel="varlen"),
    "prefix varlen_packed": dict(attention_backend="prefix", prefix_kernel="varlen_packed"),
}


def objective_batch():
    """Rows of every kind the objective draws, right-padded to LENGTH; token ids folded into VOCAB."""
    config = ObjectiveConfig(
        sequence_length=LENGTH,
        gmask_raw_length=80,
        mask_segments=3,
        mask_segment_length=32,
        mip_segments=2,
        max_span_length=4,
    )
    rng = np.random.default_rng(0)
    raw = np.arange(config.mask_window_length) + 10
    samples = [
        mask_sample(raw, rng, config, SPECIALS),
        gmask_sample(raw[: config.gmask_raw_length], rng, config, SPECIALS),
        gmask_sample(raw[:60], np.random.default_rng(3), config, SPECIALS),  # shorter: more padding
        mip_sample(make_pairs([(10, 5), (3, 8), (20, 6)]), rng, config, SPECIALS),
    ]
    batch = collate(samples, LENGTH, SPECIALS.pad)
    batch.input_ids %= VOCAB
    batch.targets %= VOCAB
    return batch


def tiny_config(**fields) -> GLMConfig:
    shape = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        inner_hidden_size=96,
        max_sequence_length=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_dtype="fp32",
    )
    return GLMConfig(**{**shape, **fields})


def logits_and_grads(fields: dict, batch, mask, state=None):
    torch.manual_seed(0)
    model = GLM(tiny_config(**fields)).double()
    if state is not None:
        model.load_state_dict(state)
    logits = model(batch.input_ids, batch.position_ids, mask)
    masked_lm_loss(logits, batch.targets, batch.loss_mask).backward()
    return model.state_dict(), logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def worst_error(got, want, batch) -> float:
    """Largest difference over the largest reference value: logits on the real rows (pad rows see
    only themselves and feed nothing), and every parameter's gradient."""
    real = batch.segment_ids != 0
    pairs = [(got[1][real], want[1][real])] + [(got[2][n], want[2][n]) for n in want[2]]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)


@pytest.fixture(scope="module")
def reference():
    batch = objective_batch()
    state, logits, grads = logits_and_grads(dict(attention_backend="reference"), batch, batch.attention_mask())
    return batch, state, (state, logits, grads)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_matches_the_reference_arithmetic_on_logits_and_gradients(name, reference, monkeypatch):
    monkeypatch.setattr(prefix_attention, "varlen_available", lambda device: True)
    monkeypatch.setattr(prefix_attention, "FLASH_DTYPES", (torch.float64,))
    monkeypatch.setattr(prefix_attention, "torch_varlen", prefix_attention.varlen_reference)  # flash's stand-in
    batch, state, want = reference
    got = logits_and_grads(BACKENDS[name], batch, batch.compact_mask(), state)
    assert worst_error(got, want, batch) <= TOLERANCE


@pytest.mark.parametrize("wrong", ["causal", "none"])
def test_a_wrong_mask_fails_the_same_comparison(wrong, reference):
    batch, state, want = reference
    if wrong == "causal":  # each segment causal: no bidirectional prefix
        mask = CompactMask(batch.segment_ids, torch.zeros_like(batch.in_prefix))
    else:  # everything sees everything
        mask = CompactMask(torch.ones_like(batch.segment_ids), torch.ones_like(batch.in_prefix))
    got = logits_and_grads(dict(attention_backend="prefix", prefix_kernel="loop"), batch, mask, state)
    assert worst_error(got, want, batch) > WRONG_BY_AT_LEAST


def test_flex_kernel_matches_the_reference_logits(reference):
    """FlexAttention on a CPU: forward only (it has no CPU backward; the GPU test covers gradients),
    fp32 (1e-5)."""
    batch, state, want = reference
    torch.manual_seed(0)
    model = GLM(tiny_config(attention_backend="prefix", prefix_kernel="flex"))
    model.load_state_dict(state)
    with torch.no_grad():
        try:
            logits = model(batch.input_ids, batch.position_ids, batch.compact_mask())
        except Exception as err:  # FlexAttention needs a working compiler toolchain on CPU
            pytest.skip(f"flex_attention unavailable on this CPU: {type(err).__name__}")
    real = batch.segment_ids != 0
    torch.testing.assert_close(logits[real].double(), want[1][real], rtol=1e-5, atol=1e-5 * float(want[1].abs().max()))


def test_dropout_is_an_error_on_the_prefix_backend_and_kept_by_auto():
    with pytest.raises(
        ConfigError,
        match="attention_backend prefix has no attention dropout .* set attention_dropout "
        "0, or use attention_backend sdpa",
    ):
        tiny_config(attention_backend="prefix", attention_dropout=0.1)
    config = tiny_config(attention_backend="auto", attention_dropout=0.5)
    assert resolve_backend(config, training=True) == "sdpa"  # dropout on: the backend that has it
    assert resolve_backend(config, training=False) == "prefix"  # no dropout in eval: the fast kernels
    assert "attention_dropout" in describe_backend(config, torch.device("cpu"))
    batch = objective_batch()
    outputs = []
    for backend, seed in (("auto", 1), ("auto", 2), ("sdpa", 1)):
        torch.manual_seed(0)
        model = GLM(tiny_config(attention_backend=backend, attention_dropout=0.5)).double().train()
        torch.manual_seed(seed)
        outputs.append(model(batch.input_ids, batch.position_ids, batch.compact_mask()))
    assert not torch.allclose(outputs[0], outputs[1])  # dropout applied: other seed, other output
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)  # exactly the sdpa path


def test_compact_mask_is_for_full_forwards_and_checked():
    batch = objective_batch()
    model = GLM(tiny_config(attention_backend="auto")).eval()
    cache = KVCache(model.config, batch.input_ids.shape[0], LENGTH, torch.float32, "cpu")
    with pytest.raises(
        InputError, match="compact mask is for full forwards; decode with a KV cache and the dense mask"
    ):
        model(batch.input_ids, batch.position_ids, batch.compact_mask(), kv_cache=cache)
    short = CompactMask(batch.segment_ids[:, :10], batch.in_prefix[:, :10])
    with pytest.raises(InputError, match=r"attention_mask.segment_ids must have shape \(4, 96\)"):
        model(batch.input_ids, batch.position_ids, short)
    with pytest.raises(InputError, match="integer segment_ids and bool in_prefix"):
        model(batch.input_ids, batch.position_ids, CompactMask(batch.segment_ids, batch.in_prefix.long()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["varlen", "varlen_packed", "flex"])
def test_cuda_kernels_match_the_reference_arithmetic_on_gpu(kernel, reference):
    """The real flash varlen and FlexAttention kernels under bf16 autocast against the fp64
    reference: the worst tensor (logits, every gradient) within 3e-2 in Frobenius norm (bf16
    rounding is ~1e-2), and a causal mask through the same kernel misses by 3x more."""
    batch, state, want = reference
    on_gpu = batch.to("cuda")

    def run(mask):
        torch.manual_seed(0)
        model = GLM(tiny_config(attention_backend="prefix", prefix_kernel=kernel)).cuda()
        model.load_state_dict(state)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(on_gpu.input_ids, on_gpu.position_ids, mask)
        masked_lm_loss(logits, on_gpu.targets, on_gpu.loss_mask).backward()
        return logits.detach().double().cpu(), {n: p.grad.double().cpu() for n, p in model.named_parameters()}

    def worst(got):
        real = batch.segment_ids != 0
        pairs = [(got[0][real], want[1][real])] + [(got[1][n], want[2][n]) for n in want[2]]
        return max(float((a - b).norm() / b.norm()) for a, b in pairs if b.norm() > 0)

    error = worst(run(batch.compact_mask()))
    wrong = worst(run(CompactMask(batch.segment_ids, torch.zeros_like(batch.in_prefix))))
    assert error <= 3e-2 and wrong > 3 * error, (error, wrong)
