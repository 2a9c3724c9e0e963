"""Training MFU of a ~1.3B-parameter GLM (1.01 B in the layers + 0.31 B tied embedding) on one GPU,
measured on the path `glm130b pretrain` runs: Trainer steps through the public API.

    python benchmarks/bench_train_mfu.py                        # 20 layers x 2048, 16 heads, vocab 150528
    python benchmarks/bench_train_mfu.py --small --device cpu   # a smoke run of the same code

One row per attention backend (`--backends`): sdpa (the dense mask: the baseline, same run), auto
(what `pretrain` picks), and prefix-LM kernels by name (varlen, varlen_packed, flex, loop). Each row
builds its model with train.builders.build_model_and_optimizer and trains with train.trainer.Trainer
(bf16 autocast over fp32 masters, fused AdamW, every block compiled as parallel.compile does) on
the pretraining sampler's micro-batches (benchmarks/objective_data.py: [gMASK], [MASK] and MIP
rows, padded), micro batch 8 x 2048. Hidden and attention dropout are 0, so that a step is
deterministic and the check below runs the timed compiled graphs.

Correctness first, on the trainer's own compiled model: the logits (real rows) and every
parameter's gradient of one micro-batch against an eager model with the same weights on the dense
SDPA path (same precision), error = |a - b| / |b| (Frobenius) of the worst tensor, budget 2e-2 in
bf16 (1e-4 in fp32); the same comparison with a wrong (plain causal) mask must miss by 3x the
candidate's error, or the check could not bite and the row fails. Figures are the Trainer's own records (median after warm-up):
tokens/s of real tokens, MFU and HFU (glm130b.model.flops.training_flops: visible pairs only;
HFU adds recomputation) against 989 TFLOP/s (--peak-tflops). A table is printed last; details to
$OUT/bench_train_mfu.json and the headline figure to the suite summary when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from objective_data import objective_sampler  # noqa: E402
from suite_summary import figure, write_summary  # noqa: E402

from glm130b.core.dtypes import DTYPES  # noqa: E402
from glm130b.model.attention import describe_backend  # noqa: E402
from glm130b.model.glm import GLM  # noqa: E402
from glm130b.model.masks import CompactMask  # noqa: E402
from glm130b.objective.batch import TrainingBatch  # noqa: E402
from glm130b.objective.loss import masked_lm_loss  # noqa: E402
from glm130b.train.builders import build_model_and_optimizer  # noqa: E402
from glm130b.train.config import TrainConfig  # noqa: E402
from glm130b.train.step import autocast  # noqa: E402
from glm130b.train.trainer import Trainer  # noqa: E402

GOAL_MFU = 0.45  # issue 10, on one H200
# The check's budget per precision: bf16 rounding puts the right mask ~5e-3 from the bf16 dense path
# on the worst tensor (a 4 x 256 GLM on a CPU), a causal mask ~4e-2 (the DeepNorm init keeps
# attention's share small); so the wrong mask must also miss by WRONG_BY x the candidate's error.
BUDGET = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 1e-4}
WRONG_BY = 3.0
CHECK_INDEX = 10**6  # the check's micro-batch: one the timed steps never draw


def train_config(args, backend: str, out_dir: str) -> TrainConfig:
    if args.small:
        shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, inner_hidden_size=176)
    else:  # head dim 128 as in GLM-130B; inner 5504 = 8/3 x 2048 rounded up to a multiple of 128 (GeGLU)
        shape = dict(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=args.hidden // 128,
            vocab_size=150528,
            inner_hidden_size=-(-args.hidden * 8 // 3 // 128) * 128,
        )
    attention = (
        dict(attention_backend=backend)
        if backend in ("sdpa", "auto")
        else dict(attention_backend="prefix", prefix_kernel=backend)
    )
    model = dict(**shape, **attention, max_sequence_length=args.seq, hidden_dropout=0.0, attention_dropout=0.0)
    cuda = args.device.startswith("cuda")
    return TrainConfig(
        model_preset="glm-130b",
        model=model,
        sequence_length=args.seq,
        micro_batch_size=args.batch,
        global_batch_size=args.batch,
        rampup_start_batch_size=None,
        train_samples=args.batch * 10**6,
        precision="bf16" if cuda else "fp32",
        device=args.device,
        peak_flops=args.peak_tflops * 1e12,
        parallel={"compile": args.compile},
        spike_guard={"enabled": False},
        tensorboard=False,
        out_dir=out_dir,
        log_every=10**6,
        eval_every=10**6,
        checkpoint_every=10**6,
    )


def loss_and_grads(model, batch: TrainingBatch, mask, precision: str):
    """Logits of the real rows and every parameter's gradient, of the mean scored-token loss."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    on_device = batch.to(device)
    with autocast(precision, device):
        logits = model(on_device.input_ids, on_device.position_ids, mask, check_inputs=False)
    masked_lm_loss(logits, on_device.targets, on_device.loss_mask).backward()
    real = logits.detach()[on_device.segment_ids != 0].float()
    return real, {name: p.grad.float() for name, p in model.named_parameters()}


def worst_error(got, want) -> float:
    """|a - b| / |b| (Frobenius) of the worst of the logits and the gradients (all-zero ones left out)."""
    pairs = [(got[0], want[0])] + [(got[1][n], want[1][n]) for n in want[1]]
    return max(
        float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
        for a, b in pairs
        if torch.linalg.vector_norm(b) > 0
    )


def check(trainer: Trainer, config: TrainConfig, batch: TrainingBatch) -> tuple[bool, str]:
    """The trainer's model against an eager dense-SDPA copy of it; a causal mask must fail."""
    model = trainer.model
    with torch.device(trainer.device):
        reference = GLM(config.model_config(attention_backend="sdpa"))
    reference.load_state_dict(model.state_dict())
    want = loss_and_grads(reference, batch, batch.attention_mask().to(trainer.device), config.precision)
    del reference
    got = loss_and_grads(model, batch, batch.compact_mask(), config.precision)
    error = worst_error(got, want)
    del got
    causal = CompactMask(batch.segment_ids, torch.zeros_like(batch.in_prefix))  # no bidirectional prefix
    wrong = worst_error(loss_and_grads(model, batch, causal, config.precision), want)
    model.zero_grad(set_to_none=True)
    budget = BUDGET[config.precision]
    ok = error <= budget and wrong > WRONG_BY * error
    text = f"error {error:.2e} (budget {budget:g}), causal mask {wrong:.2e}"
    return ok, ("ok: " if ok else "FAILED: ") + text + (
        "" if wrong > WRONG_BY * error else f" (not {WRONG_BY}x the error: the check cannot tell)"
    )


def run_backend(args, backend: str, sampler) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        config = train_config(args, backend, out_dir)
        torch.manual_seed(0)
        trainer = Trainer(config, build_model_and_optimizer(config), sampler, show_progress=False)
        what = describe_backend(trainer.model.config, trainer.device, DTYPES[config.precision])
        ok, verdict = check(trainer, config, sampler.micro_batch(CHECK_INDEX))  # compiles on the way
        print(f"check {backend}: {verdict}", flush=True)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        records = [trainer.step() for _ in range(args.steps)]
        timed = records[min(args.warmup, args.steps - 1) :]
        row = {
            "backend": backend,
            "runs": what,
            "check": verdict,
            "ok": ok,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed),
            "hfu": statistics.median(r["hfu"] for r in timed),
            "losses": [r["loss"] for r in records],
            "peak_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30
            if trainer.device.type == "cuda"
            else None,
        }
        del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="2 layers x 64, batch 2 x 128: a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--backends", default=None, help="default: sdpa,auto,flex,varlen_packed on CUDA, sdpa,auto elsewhere"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12, help="Trainer steps per backend, warm-up included")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048, help="a multiple of 128 (heads of dim 128)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense datasheet peak (H100/H200 SXM)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="(compiled by default on CUDA)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.small:
        args.batch, args.seq, args.steps, args.warmup = 2, 128, 3, 1
    args.compile = args.compile and cuda  # inductor on a CPU compiles for minutes: not a smoke run
    backends = (args.backends or ("sdpa,auto,flex,varlen_packed" if cuda else "sdpa,auto")).split(",")
    vocab = 512 if args.small else 150528
    sampler = objective_sampler(vocab, args.seq, args.batch)
    rows = [run_backend(args, backend, sampler) for backend in backends]

    config = train_config(args, "auto", "unused").model_config()
    with torch.device("meta"):
        params = GLM(config).num_parameters()
    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "config": config.to_dict(),
        "params": params,
        "batch": args.batch,
        "seq": args.seq,
        "compiled": args.compile,
        "peak_tflops": args.peak_tflops,
        "rows": rows,
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_train_mfu.json").write_text(json.dumps(info, indent=2))
    by_name = {r["backend"]: r for r in rows if r["ok"]}
    if "auto" in by_name:
        baseline = by_name.get("sdpa")
        write_summary(
            "train_mfu",
            [
                figure(
                    f"training MFU, {params / 1e9:.2f}B GLM, {args.batch} x {args.seq} objective batches, "
                    f"{'bf16' if cuda else 'fp32'}, {'compiled' if args.compile else 'eager'}: {by_name['auto']['runs']}",
                    by_name["auto"]["mfu"],
                    "%",
                    GOAL_MFU,
                    "dense SDPA",
                    baseline["mfu"] if baseline else None,
                )
            ],
        )
    print(
        f"\n{info['device']}, torch {info['torch']}, {params / 1e9:.2f}B parameters ({config.num_layers} x "
        f"{config.hidden_size}), batch {args.batch} x {args.seq}, compiled {args.compile}, peak {args.peak_tflops:g} TFLOP/s"
    )
    print(f"{'backend':<14} {'tokens/s':>10} {'MFU':>7} {'HFU':>7} {'peak GiB':>9}  check / what runs")
    for r in rows:
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(
            f"{r['backend']:<14} {r['tokens_per_s']:>10,.0f} {r['mfu']:>7.1%} {r['hfu']:>7.1%} {mem:>9}  "
            f"{r['check']} / {r['runs']}"
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
