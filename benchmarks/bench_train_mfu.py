"""Training MFU of a ~1.3B-parameter GLM (1.01 B in the layers + 0.31 B tied embedding) on one GPU: the real objective's masks, bf16, compiled.

    python benchmarks/bench_train_mfu.py                   # 20 layers, hidden 2048, 16 heads, vocab 150528
    python benchmarks/bench_train_mfu.py --small --device cpu   # a smoke run

Each variant trains the same model from the same init on the same batches (micro batch 8 x 2048,
masks drawn like the pretraining mix: 70 % [gMASK] rows, 30 % [MASK] rows, see
bench_prefix_attention.recipe_masks), bf16 autocast over fp32 master weights, fused AdamW, every
transformer block torch.compile'd (glm130b.distributed.parallelize.apply_compile). Variants differ only in the
attention kernel: the model's own SDPA with a dense mask (baseline), FlexAttention with a block
mask (baseline), and the compact-form plan's flash varlen calls (ours). Correctness first: the
first-step losses of all variants must agree (bf16: within 2 %). MFU = model FLOPs per token
(glm130b.model.flops.training_flops_per_token: 6 N + 12 L C S, PaLM's convention, dense attention
counted) x tokens/s / peak (989 TFLOP/s bf16 dense on H100/H200 unless --peak-tflops). A table is
printed last; details go to $OUT/bench_train_mfu.json when OUT is set. attention_dropout is 0
(the fast kernels have none); hidden dropout stays 0.1.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefix_attention import recipe_masks  # noqa: E402

from glm130b.distributed.parallelize import apply_compile  # noqa: E402
from glm130b.model.config import GLMConfig  # noqa: E402
from glm130b.model.flops import training_flops_per_token  # noqa: E402
from glm130b.model.glm import GLM  # noqa: E402
from glm130b.model.masks import dense_attention_mask  # noqa: E402
from glm130b.model.prefix_attention import PrefixLMPlan, use_plan_attention  # noqa: E402
from glm130b.objective.loss import masked_lm_loss  # noqa: E402


def model_config(small: bool, layers: int = 20, hidden: int = 2048) -> GLMConfig:
    if small:
        return GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, inner_hidden_size=176,
                         max_sequence_length=128, attention_dropout=0.0, rotary_dtype="fp32")
    # head dim 128 as in GLM-130B; inner = 8/3 x hidden rounded up to a multiple of 128 (the
    # GLM-130B GeGLU ratio: 5504 at hidden 2048)
    inner = -(-hidden * 8 // 3 // 128) * 128
    return GLMConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 128, vocab_size=150528,
                     inner_hidden_size=inner, max_sequence_length=2048, attention_dropout=0.0, rotary_dtype="fp32")


def make_batches(cfg: GLMConfig, n: int, batch: int, length: int, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        seg, pre = recipe_masks(batch, length, seed=i, mask_fraction=0.3)
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
        loss_mask = ((seg != 0) & ~pre).float()
        pos = torch.arange(length).expand(batch, length).contiguous()
        out.append(dict(ids=ids.to(device), pos=pos.to(device), targets=targets.to(device),
                        loss_mask=loss_mask.to(device), seg=seg, pre=pre))
    return out


def run_variant(name, cfg, batches, device, steps, compile_blocks, dtype):
    torch.manual_seed(0)
    model = GLM(cfg).to(device)
    use_plan_attention(model)
    if compile_blocks:
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda" or None)
    model.train()
    times, losses = [], []
    for step in range(steps):
        b = batches[step % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # the mask is built inside the timed step: its cost is part of each variant
        if name == "dense":
            mask = dense_attention_mask(b["seg"].to(device), b["pre"].to(device))
        else:
            mask = PrefixLMPlan.build(b["seg"], b["pre"], backend=name, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(b["ids"], b["pos"], mask, check_inputs=False)
        loss = masked_lm_loss(logits, b["targets"], b["loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return times, losses, peak_mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=15, help="steps per variant; the first 5 are warm-up")
    ap.add_argument("--variants", default="dense,flex,varlen,varlen_packed")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="compile on CPU too (the default only compiles on CUDA)")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048, help="a multiple of 128 (heads of dim 128)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense datasheet peak (H100/H200 SXM)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.small:
        args.batch, args.seq, args.steps = 2, 128, 4
    cfg = model_config(args.small, args.layers, args.hidden)
    # every block is its own compiled frame and `layer` is an int argument: leave room to recompile
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_blocks = not args.no_compile and (device.type == "cuda" or args.compile)
    batches = make_batches(cfg, 4, args.batch, args.seq, device)
    variants = [v for v in args.variants.split(",") if v]
    if device.type != "cuda":
        variants = [v for v in variants if not v.startswith("varlen") and v != "flex"] + ["loop"]  # no flash / flex backward on CPU
    warm = min(5, args.steps - 1)
    flops_per_token = training_flops_per_token(cfg, args.seq)
    with torch.device("meta"):
        n_params = GLM(cfg).num_parameters()
    rows, first_losses = [], {}
    for name in variants:
        try:
            times, losses, mem = run_variant(name, cfg, batches, device, args.steps, compile_blocks, dtype)
        except Exception as err:
            print(f"{name}: failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        first_losses[name] = losses[0]
        step_s = statistics.median(times[warm:])
        tokens = args.batch * args.seq
        tps = tokens / step_s
        rows.append({"variant": name, "step_ms": step_s * 1e3, "tokens_per_s": tps,
                     "mfu": flops_per_token * tps / (args.peak_tflops * 1e12), "peak_mem_gib": mem,
                     "losses": losses})
    ref = first_losses.get("dense")
    checks = {n: ("ok" if ref is None or abs(loss - ref) <= 0.02 * abs(ref) else f"MISMATCH {loss:.4f} vs dense {ref:.4f}")
              for n, loss in first_losses.items()}
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "config": cfg.to_dict(), "params": n_params, "batch": args.batch,
            "seq": args.seq, "compiled": compile_blocks, "dtype": str(dtype), "flops_per_token": flops_per_token,
            "peak_tflops": args.peak_tflops, "checks": checks, "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_train_mfu.json").write_text(json.dumps(info, indent=2))
    for n, s in checks.items():
        print(f"check {n}: first-step loss {s}")
    print(f"\n{info['device']}, torch {info['torch']}, {cfg.num_layers} layers x {cfg.hidden_size}, batch "
          f"{args.batch} x {args.seq}, {dtype}, compiled {compile_blocks}")
    print(f"{'variant':<8} {'step ms':>9} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for r in rows:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['variant']:<8} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} {r['mfu']:>7.1%} {mem:>9}")
    return 0 if all(s == "ok" for s in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
