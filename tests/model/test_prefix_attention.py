"""The prefix-LM attention plan against the dense-mask reference (fp64 on CPU, so the only
difference is summation order: 1e-10).

The "varlen" backends run here with `varlen_reference` (one SDPA per packed sequence, causal
aligned bottom-right) in place of the CUDA flash kernel: that checks all of the plan's gathering,
packing and scattering; the flash kernel's own numerics are checked by
benchmarks/bench_prefix_attention.py on the GPU before it times anything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm130b.core.errors import InputError
from glm130b.model.masks import dense_attention_mask
from glm130b.model.prefix_attention import PrefixLMPlan, attention_flops, use_plan_attention, varlen_reference

TOL = dict(rtol=1e-9, atol=1e-10)


def compact_form(rows: list[list[tuple[int, int]]], length: int):
    """rows: per batch row a list of (prefix length, segment length); the rest is padding."""
    seg = torch.zeros(len(rows), length, dtype=torch.long)
    pre = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, segments in enumerate(rows):
        s = 0
        for i, (p, n) in enumerate(segments):
            seg[b, s:s + n] = i + 1
            pre[b, s:s + p] = True
            s += n
    return seg, pre


CASES = {
    "gmask": [[(5, 20), ], [(12, 17)], [(1, 24)]],                 # one segment per row, padded
    "mask_blocks": [[(3, 6), (4, 6), (2, 6), (5, 6)], [(6, 12), (2, 12)], [(4, 4), (0, 10)]],  # block-diagonal
    "edge": [[(24, 24)], [(0, 24)], [(0, 0)] * 0 + [(3, 3)]],      # all prefix, all causal, tiny + pad
}


def dense_reference(q, k, v, seg, pre):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~dense_attention_mask(seg, pre))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["varlen", "varlen_packed", "loop"])
def test_plan_matches_dense_mask_forward_and_backward(case, backend):
    torch.manual_seed(0)
    seg, pre = compact_form(CASES[case], 24)
    B, H, L, D = seg.shape[0], 3, 24, 8
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plan = PrefixLMPlan.build(seg, pre, backend=backend)
    out = plan.attend(q, k, v, varlen_fn=varlen_reference)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref_out = dense_reference(q, k, v, seg, pre)
    want = [ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_flex_backend_matches_on_scored_rows():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    seg, pre = compact_form(CASES["mask_blocks"], 32)
    q, k, v = (torch.randn(3, 2, 32, 16) for _ in range(3))
    plan = PrefixLMPlan.build(seg, pre, backend="flex")
    try:
        out = plan.attend(q, k, v)
    except Exception as err:  # FlexAttention needs a working compiler toolchain on CPU
        pytest.skip(f"flex_attention unavailable on this CPU: {type(err).__name__}")
    ref = dense_reference(q, k, v, seg, pre)
    scored = (seg != 0)[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[scored], ref[scored], rtol=1e-4, atol=1e-5)


def test_visible_pairs_counts_the_dense_mask():
    seg, pre = compact_form(CASES["mask_blocks"], 24)
    plan = PrefixLMPlan.build(seg, pre, backend="loop")
    visible_non_pad = (~dense_attention_mask(seg, pre)).squeeze(1) & (seg != 0).unsqueeze(-1)
    assert plan.visible_pairs() == int(visible_non_pad.sum())
    assert attention_flops(plan, 2, 8) == pytest.approx(3.5 * 4 * 2 * 8 * plan.visible_pairs())


def test_plan_rejects_prefix_not_at_segment_start():
    seg = torch.ones(1, 8, dtype=torch.long)
    pre = torch.tensor([[False, True, True, False, False, False, False, False]])
    with pytest.raises(InputError, match="not at the start"):
        PrefixLMPlan.build(seg, pre, backend="loop")
    seg2 = torch.tensor([[1, 1, 2, 2, 1, 1, 0, 0]])
    with pytest.raises(InputError, match="not contiguous"):
        PrefixLMPlan.build(seg2, torch.zeros(1, 8, dtype=torch.bool), backend="loop")


def test_model_with_plan_mask_matches_dense_mask(tiny_config):
    from glm130b.model.glm import GLM

    torch.manual_seed(0)
    model = GLM(tiny_config).double()
    seg, pre = compact_form(CASES["mask_blocks"], 24)
    ids = torch.randint(0, tiny_config.vocab_size, seg.shape)
    pos = torch.arange(24).expand_as(ids)
    want = model(ids, pos, dense_attention_mask(seg, pre))
    use_plan_attention(model)
    plan = PrefixLMPlan.build(seg, pre, backend="varlen")
    plan_attend = plan.attend
    plan.attend = lambda q, k, v: plan_attend(q, k, v, varlen_fn=varlen_reference)
    got = model(ids, pos, plan, check_inputs=False)
    scored = seg != 0
    torch.testing.assert_close(got[scored], want[scored], **TOL)
    # the dense mask still works on the patched model
    torch.testing.assert_close(model(ids, pos, dense_attention_mask(seg, pre)), want, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "varlen_packed"])
def test_flash_varlen_matches_dense_mask_on_gpu(backend):
    """The real flash varlen kernel (bottom-right causal, sequences without keys or queries)."""
    torch.manual_seed(0)
    seg, pre = compact_form(CASES["gmask"] + CASES["mask_blocks"] + CASES["edge"], 24)
    B, H, L, D = seg.shape[0], 4, 24, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    plan = PrefixLMPlan.build(seg, pre, backend=backend, device="cuda")
    out = plan.attend(q, k, v)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q32, k32, v32, seg.cuda(), pre.cuda())
    want = [ref, *torch.autograd.grad(ref, (q32, k32, v32), grad.float())]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2, msg=name)
