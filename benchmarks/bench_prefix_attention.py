"""Prefix-LM attention on the objective's masks: forward + backward TFLOP/s of every kernel.

    python benchmarks/bench_prefix_attention.py            # ANCHORS shape: B 8, H 16, L 2048, D 128, bf16
    python benchmarks/bench_prefix_attention.py --small --device cpu   # a smoke run

The masks are one micro-batch of the pretraining sampler (benchmarks/objective_data.py: the
recipe's [gMASK], [MASK] and MIP rows, padded). Correctness first: every kernel's output and q, k,
v gradients against SDPA with the dense mask in fp32, error relative to the largest reference
value, budget 2e-2 in bf16 (rounding ~4e-3) or 1e-4 in fp32; the same comparison of causal SDPA
(the wrong mask) must miss the budget, or the check could not bite and the run fails. Then the
timing, with the baselines in the same run: causal SDPA (the flash ceiling; not this mask),
SDPA with the dense bool mask. FLOPs count the visible (query, key) pairs only
(glm130b.model.flops.attention_kernel_flops; causal SDPA counted the same way over its own pairs).
A table is printed last; details go to $OUT/bench_prefix_attention.json and the headline figure to
the suite's summary (suite_summary.py) when OUT is set. Exit status 1 on a failed check.
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

from objective_data import objective_sampler  # noqa: E402
from suite_summary import figure, write_summary  # noqa: E402

from glm130b.model.flops import attention_kernel_flops  # noqa: E402
from glm130b.model.masks import dense_attention_mask, visible_pairs  # noqa: E402
from glm130b.model.prefix_attention import KERNELS, PrefixLMPlan, resolve_kernel  # noqa: E402

GOAL_TFLOPS = 300.0  # issue 10, on one H200
LABELS = {
    "varlen": "ours: 2 flash varlen calls tiling the rows (no gather)",
    "varlen_packed": "ours: 2 flash varlen calls on gathered rows",
    "flex": "FlexAttention + block mask (compiled)",
    "loop": "ours: one SDPA per segment half",
    "dense": "baseline: SDPA with the dense bool mask",
    "causal": "ceiling: SDPA causal (flash; not the prefix-LM mask)",
}


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


def relative_errors(out, grads, ref, ref_grads, scored) -> list[float]:
    """Output (real rows: pad rows feed nothing, kernels differ there) and dq, dk, dv, each over
    the largest reference value."""
    pairs = [(out.detach().float() * scored, ref.detach() * scored), *zip((g.float() for g in grads), ref_grads)]
    return [float((a - r).abs().max() / r.abs().max()) for a, r in pairs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="B 2, H 2, L 256, D 32: a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--kernels", default=",".join(KERNELS), help="prefix-LM kernels to time (those the device runs)")
    args = ap.parse_args(argv)
    if args.small:
        args.batch, args.heads, args.seq, args.dim, args.iters = 2, 2, 256, 32, 3
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, L, D = args.batch, args.heads, args.seq, args.dim
    batch = objective_sampler(vocab_size=1024, sequence_length=L, batch_size=B).micro_batch(0)
    seg, pre = batch.segment_ids, batch.in_prefix
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, D, device=device, dtype=dtype)
    dense_mask = dense_attention_mask(seg.to(device), pre.to(device))
    auto = resolve_kernel("auto", device, dtype)
    kernels = [x for x in args.kernels.split(",") if x]
    if device.type != "cuda":  # no flash varlen; FlexAttention has no CPU backward
        kernels = [x for x in kernels if not x.startswith("varlen") and x != "flex"]
    t0 = time.perf_counter()
    plans = {name: PrefixLMPlan.build(seg, pre, kernel=name, device=device, dtype=dtype) for name in kernels}
    plan_seconds = (time.perf_counter() - t0) / max(len(plans), 1)

    # ---------------------------------------------------------------- correctness first
    scored = (seg != 0).to(device)[:, None, :, None]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=~dense_mask)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
    budget = 2e-2 if dtype == torch.bfloat16 else 1e-4
    runs = {name: (lambda plan=plan: plan.attend(q, k, v)) for name, plan in plans.items()}
    runs["dense"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=~dense_mask)
    runs["causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    checks, errors = {}, {}
    for name, run in runs.items():
        try:
            out = run()
            grads = torch.autograd.grad(out, (q, k, v), grad)
        except Exception as err:
            checks[name] = f"FAILED to run: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        errors[name] = relative_errors(out, grads, ref, ref_grads, scored)
        worst = max(errors[name])
        if name == "causal":  # the wrong mask: must miss, or the check cannot tell right from wrong
            checks[name] = (
                f"ok: the wrong mask misses ({worst:.2e} > {budget:g})"
                if worst > budget
                else f"FAILED: the wrong mask passes ({worst:.2e} <= {budget:g}); the check cannot bite"
            )
        else:
            checks[name] = "ok" if worst <= budget else f"MISMATCH: max error {worst:.2e} (budget {budget:g})"
    for name, status in checks.items():
        print(f"check {name}: {status}", flush=True)
    passed = all(s.startswith("ok") for s in checks.values())

    # ---------------------------------------------------------------- timing
    pairs = visible_pairs(seg, pre)
    causal_pairs = B * L * (L + 1) // 2
    rows = []
    for name, run in runs.items():
        if name not in errors:
            continue

        def fn(run=run):
            torch.autograd.grad(run(), (q, k, v), grad)

        seconds = timed(fn, device, args.iters, warmup=3 if device.type == "cuda" else 1)
        work = attention_kernel_flops(causal_pairs if name == "causal" else pairs, H, D)
        label = LABELS[name] + ("" if checks[name].startswith("ok") else "  [FAILED CHECK]")
        rows.append({"variant": name, "what": label, "ms": seconds * 1e3, "tflops": work / seconds / 1e12})

    tflops = {r["variant"]: r["tflops"] for r in rows}
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": [B, H, L, D],
        "dtype": str(dtype),
        "auto_kernel": auto,
        "visible_fraction": pairs / (B * L * L),
        "plan_build_ms": plan_seconds * 1e3,
        "checks": checks,
        "relative_errors_out_dq_dk_dv": errors,
        "rows": rows,
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_prefix_attention.json").write_text(json.dumps(info, indent=2))
    if passed and auto in tflops:
        write_summary(
            "prefix_attention",
            [
                figure(
                    f"prefix-LM attention fwd+bwd, kernel {auto}, B {B} H {H} L {L} D {D} {str(dtype)[6:]}",
                    tflops[auto],
                    "TFLOP/s",
                    GOAL_TFLOPS,
                    "SDPA + dense mask",
                    tflops.get("dense"),
                )
            ],
        )
    print(
        f"\n{info['device']}, torch {info['torch']}, B {B} H {H} L {L} D {D} {dtype}, objective masks: "
        f"visible {info['visible_fraction']:.1%} of L^2, plan build {plan_seconds * 1e3:.1f} ms (host, once per forward)"
    )
    print(f"{'variant':<14} {'ms':>9} {'TFLOP/s':>9}  what")
    for r in rows:
        print(f"{r['variant']:<14} {r['ms']:>9.3f} {r['tflops']:>9.3g}  {r['what']}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
