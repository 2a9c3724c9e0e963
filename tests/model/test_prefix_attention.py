"""The prefix-LM attention kernels against SDPA with the dense mask, kernel by kernel (fp64 on CPU,
so the only difference is summation order: 1e-10). The whole model on every backend, against the
reference arithmetic: tests/model/test_attention_backends.py.

The "varlen" kernels run here with `varlen_reference` (one SDPA per packed sequence, causal
aligned bottom-right) in place of the CUDA flash kernel: that checks all of the plan's gathering,
packing and scattering; the flash kernel's own numerics are checked on the GPU (the gpu test
below, and benchmarks/bench_prefix_attention.py before it times anything).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm130b.core.errors import InputError
from glm130b.model import prefix_attention
from glm130b.model.flops import attention_kernel_flops
from glm130b.model.masks import dense_attention_mask, visible_pairs
from glm130b.model.prefix_attention import PrefixLMPlan, resolve_kernel, varlen_reference

TOL = dict(rtol=1e-9, atol=1e-10)


def compact_form(rows: list[list[tuple[int, int]]], length: int):
    """rows: per batch row a list of (prefix length, segment length); the rest is padding."""
    seg = torch.zeros(len(rows), length, dtype=torch.long)
    pre = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, segments in enumerate(rows):
        s = 0
        for i, (p, n) in enumerate(segments):
            seg[b, s : s + n] = i + 1
            pre[b, s : s + p] = True
            s += n
    return seg, pre


CASES = {
    "gmask": [
        [
            (5, 20),
        ],
        [(12, 17)],
        [(1, 24)],
    ],  # one segment per row, padded
    "mask_blocks": [[(3, 6), (4, 6), (2, 6), (5, 6)], [(6, 12), (2, 12)], [(4, 4), (0, 10)]],  # block-diagonal
    "edge": [[(24, 24)], [(0, 24)], [(0, 0)] * 0 + [(3, 3)]],  # all prefix, all causal, tiny + pad
}


def dense_reference(q, k, v, seg, pre):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~dense_attention_mask(seg, pre))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kernel", ["varlen", "varlen_packed", "loop"])
def test_plan_matches_dense_mask_forward_and_backward(case, kernel, monkeypatch):
    monkeypatch.setattr(prefix_attention, "varlen_available", lambda device: True)  # varlen_reference stands in
    torch.manual_seed(0)
    seg, pre = compact_form(CASES[case], 24)
    B, H, L, D = seg.shape[0], 3, 24, 8
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plan = PrefixLMPlan.build(seg, pre, kernel=kernel)
    out = plan.attend(q, k, v, varlen_fn=varlen_reference)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref_out = dense_reference(q, k, v, seg, pre)
    want = [ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_visible_pairs_counts_the_dense_mask(case):
    seg, pre = compact_form(CASES[case], 24)
    visible_non_pad = (~dense_attention_mask(seg, pre)).squeeze(1) & (seg != 0).unsqueeze(-1)
    assert visible_pairs(seg, pre) == int(visible_non_pad.sum())


def test_visible_pairs_by_hand_and_kernel_flops():
    seg, pre = compact_form(CASES["mask_blocks"][:1], 24)
    # segments of 6 tokens with prefixes 3, 4, 2, 5: p^2 + p (n - p) + (n - p)(n - p + 1) / 2 each
    assert visible_pairs(seg, pre) == sum(p * p + p * (6 - p) + (6 - p) * (7 - p) // 2 for p in (3, 4, 2, 5))
    assert attention_kernel_flops(100, 2, 8) == 3.5 * 4 * 100 * 2 * 8


def test_plan_rejects_prefix_not_at_segment_start():
    seg = torch.ones(1, 8, dtype=torch.long)
    pre = torch.tensor([[False, True, True, False, False, False, False, False]])
    with pytest.raises(InputError, match="not at the start"):
        PrefixLMPlan.build(seg, pre, kernel="loop")
    seg2 = torch.tensor([[1, 1, 2, 2, 1, 1, 0, 0]])
    with pytest.raises(InputError, match="not contiguous"):
        PrefixLMPlan.build(seg2, torch.zeros(1, 8, dtype=torch.bool), kernel="loop")


def test_kernel_choice(monkeypatch):
    seg, pre = compact_form(CASES["gmask"], 24)
    assert PrefixLMPlan.build(seg, pre).kernel == "loop"  # auto on a CPU: no flash varlen, no FlexAttention backward
    with pytest.raises(
        InputError, match="prefix_kernel varlen needs flash varlen attention .* use prefix_kernel auto, flex or loop"
    ):
        PrefixLMPlan.build(seg, pre, kernel="varlen")
    with pytest.raises(InputError, match="prefix_kernel must be one of"):
        PrefixLMPlan.build(seg, pre, kernel="dense")
    cuda = torch.device("cuda")  # as torch with flash varlen would see it
    monkeypatch.setattr(prefix_attention, "varlen_available", lambda device: device.type == "cuda")
    assert resolve_kernel("auto", cuda, torch.bfloat16) == "varlen"
    assert resolve_kernel("auto", cuda, torch.float32) == "flex"  # flash takes fp16 and bf16 only
    with pytest.raises(InputError, match="fp16 or bf16"):
        resolve_kernel("varlen_packed", cuda, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["varlen", "varlen_packed", "flex"])
def test_cuda_kernels_match_dense_mask_on_gpu(kernel):
    """The real CUDA kernels: flash varlen (bottom-right causal, sequences without keys or queries)
    and FlexAttention, bf16 against fp32 (rounding: ~1e-2)."""
    torch.manual_seed(0)
    seg, pre = compact_form(CASES["gmask"] + CASES["mask_blocks"] + CASES["edge"], 24)
    B, H, L, D = seg.shape[0], 4, 24, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    plan = PrefixLMPlan.build(seg, pre, kernel=kernel, device="cuda")
    out = plan.attend(q, k, v)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q32, k32, v32, seg.cuda(), pre.cuda())
    want = [ref, *torch.autograd.grad(ref, (q32, k32, v32), grad.float())]
    scored = (seg != 0).cuda()[:, None, :, None]  # flex gives pad rows zeros, the dense mask their own value
    got[0], want[0] = got[0] * scored, want[0] * scored
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2, msg=name)
