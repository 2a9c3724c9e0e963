"""Prefix-LM attention fed by the compact mask form: forward + backward TFLOP/s.

    python benchmarks/bench_prefix_attention.py            # ANCHORS shape: B 8, H 16, L 2048, D 128, bf16
    python benchmarks/bench_prefix_attention.py --small --device cpu   # a smoke run

Masks are drawn as the GLM-130B objective shapes them (SPEC.md section 10): [gMASK] rows (one
segment of 2001 tokens: 2000 raw + [gMASK] + <sop> - 1, whose last 20..100 % is the causal
suffix, padded to 2048); with --mix, 30 % of rows are [MASK] rows (4 segments of 512, ~85 %
bidirectional context). Every variant is first checked against the dense-mask SDPA reference
(fp32), then timed; baselines (causal SDPA = the flash ceiling, FlexAttention with a block mask,
SDPA with a dense mask) run in the same process. FLOPs count the visible (query, key) pairs:
forward 4 * pairs * D per head, backward 2.5 x forward (the flash-attention convention; causal
SDPA counted the same way, L (L + 1) / 2 pairs per row block). A table is printed last; details go
to $OUT/bench_prefix_attention.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glm130b.model.masks import dense_attention_mask  # noqa: E402
from glm130b.model.prefix_attention import PrefixLMPlan, attention_flops  # noqa: E402


def recipe_masks(batch: int, length: int, seed: int = 0, mask_fraction: float = 0.0):
    """Compact forms (segment_ids, in_prefix) [batch, length] drawn like the pretraining objective."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(batch, length, dtype=torch.long)
    pre = torch.zeros(batch, length, dtype=torch.bool)
    raw = length * 2000 // 2048
    for b in range(batch):
        if float(torch.rand(1, generator=g)) < mask_fraction:  # [MASK]: 4 segments of length / 4
            n = length // 4
            for i in range(4):
                context = int(n * (0.8 + 0.1 * float(torch.rand(1, generator=g))))
                seg[b, i * n:(i + 1) * n] = i + 1
                pre[b, i * n:i * n + context] = True
        else:  # [gMASK]: source + [gMASK] bidirectional, then <sop> + target[:-1] causal
            suffix = max(1, int(raw * (0.2 + 0.8 * float(torch.rand(1, generator=g)))))
            used = raw + 1
            seg[b, :used] = 1
            pre[b, :used - suffix] = True
    return seg, pre


def timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of fn() (forward + backward)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="B 2, H 2, L 256, D 32: a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--mix", action="store_true", help="30 %% [MASK] rows (block-diagonal) among the [gMASK] rows")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default="varlen,varlen_packed,flex,dense,causal,loop")
    args = ap.parse_args(argv)
    if args.small:
        args.batch, args.heads, args.seq, args.dim, args.iters = 2, 2, 256, 32, 3
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, L, D = args.batch, args.heads, args.seq, args.dim
    seg, pre = recipe_masks(B, L, mask_fraction=0.3 if args.mix else 0.0)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, D, device=device, dtype=dtype)
    t0 = time.perf_counter()
    plans = {}
    variants = [x for x in args.variants.split(",") if x]
    for name in ("varlen", "varlen_packed", "loop", "flex", "dense"):
        if name not in variants:
            continue
        if name.startswith("varlen") and device.type != "cuda":
            print("varlen: needs CUDA flash attention, skipped on", device)
            continue
        plans[name] = PrefixLMPlan.build(seg, pre, backend=name, device=device)
    plan_seconds = (time.perf_counter() - t0) / max(len(plans), 1)

    # ---------------------------------------------------------------- correctness first
    scored = (seg != 0).to(device)[:, None, :, None]
    with torch.enable_grad():
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=~dense_attention_mask(seg, pre).to(device))
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
    # error relative to the largest reference value: a wrong mask is off by O(1), bf16 rounding by ~1e-3
    budget = 2e-2 if dtype == torch.bfloat16 else 1e-4
    checks, errors = {}, {}
    for name, plan in plans.items():
        try:
            out = plan.attend(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), grad)
        except Exception as err:  # e.g. no compiler for FlexAttention on this CPU
            checks[name] = f"failed to run: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        # pad rows feed nothing (their outputs differ by kernel), so outputs compare on scored rows
        # and every gradient compares whole
        pairs = [(out.float() * scored, ref * scored), *zip((g.float() for g in grads), ref_grads)]
        errors[name] = [float((a - r).abs().max() / r.abs().max()) for a, r in pairs]
        worst = max(errors[name])
        checks[name] = "ok" if worst <= budget else f"MISMATCH: max error {worst:.2e} of the largest value (budget {budget:g})"
    for name, status in checks.items():
        print(f"check {name}: {status}")

    # ---------------------------------------------------------------- timing
    pairs_plan = next(iter(plans.values())) if plans else PrefixLMPlan.build(seg, pre, backend="loop")
    flops = attention_flops(pairs_plan, H, D)
    rows = []
    for name in variants:
        if name == "causal":
            def fn():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(out, (q, k, v), grad)
            work = 3.5 * 4.0 * B * H * D * L * (L + 1) / 2
            label = "SDPA causal (ceiling; not the prefix-LM mask)"
        elif name in plans and name in errors:  # timed even on a mismatch; the table flags it
            plan = plans[name]

            def fn(plan=plan):
                out = plan.attend(q, k, v)
                torch.autograd.grad(out, (q, k, v), grad)
            work = flops
            label = {"varlen": "ours: 2 flash varlen calls tiling the rows (no gather)",
                     "varlen_packed": "ours: 2 flash varlen calls on gathered rows",
                     "loop": "ours: one SDPA per segment half",
                     "flex": "FlexAttention + block mask (compiled)",
                     "dense": "SDPA with a dense bool mask"}[name]
        else:
            continue
        seconds = timed(fn, device, args.iters, warmup=3 if device.type == "cuda" else 1)
        if name in checks and checks[name] != "ok":
            label += "  [MISMATCH, see the check above]"
        rows.append({"variant": name, "what": label, "ms": seconds * 1e3, "tflops": work / seconds / 1e12})

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": [B, H, L, D], "dtype": str(dtype), "mix": args.mix,
            "visible_fraction": pairs_plan.visible_pairs() / (B * L * L), "plan_build_ms": plan_seconds * 1e3,
            "checks": checks, "relative_errors_out_dq_dk_dv": errors, "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_prefix_attention.json").write_text(json.dumps(info, indent=2))
    print(f"\n{info['device']}, torch {info['torch']}, B {B} H {H} L {L} D {D} {dtype}, "
          f"visible {info['visible_fraction']:.1%} of L^2, plan build {plan_seconds * 1e3:.1f} ms (host, once per batch)")
    print(f"{'variant':<8} {'ms':>9} {'TFLOP/s':>9}  what")
    for r in rows:
        print(f"{r['variant']:<8} {r['ms']:>9.3f} {r['tflops']:>9.3g}  {r['what']}")
    return 0 if all(s == "ok" or s.startswith("failed to run") and n == "flex" for n, s in checks.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
