"""Fine-tuning per method (issue 17): trained parameters, peak memory and steps/s on the same
model, and exact match before and after on the toy task's held-out words.

  python benchmarks/bench_finetune.py --small --device cpu   # toy sizes on the CPU (checks the script)
  python benchmarks/bench_finetune.py --device cuda          # speed, memory and the toy task on the GPU
  python benchmarks/bench_finetune.py --device cuda --no-toy # the GPU suite's line: speed and memory
  python benchmarks/bench_finetune.py ... --append           # also append the tables to benchmarks/RESULTS.md

Speed and memory: one random-weight GLM for every method (cuda: 18 layers, hidden 2048, GLM-130B's
vocabulary, bf16 autocast, one sequence of 2048 tokens a step; --small: 4 layers, hidden 256,
vocabulary 16384, fp32, 2 x 256 tokens), built as `glm130b finetune` builds it (runner.apply_method:
a frozen base in the compute dtype, quantized for lora-int8/int4, fp32 adapters) and stepped with
the trainer's arithmetic (train.step.forward_backward, gradient clipping, AdamW): 3 steps, then 10
timed (--small: 1 and 3). Each method runs in its own process, so that peak memory is its own: on CUDA
torch.cuda.max_memory_allocated (weights, optimizer, activations: everything), on the CPU the peak
resident memory minus the process's before the model was built.

Quality: the toy task (glm130b.finetune.toy_task) on the same device in fp32: its base is built,
then every method runs with the settings of toy_task.METHOD_RUNS through run_finetune; exact match
of the base and of the fine-tuned model on the 100 held-out words (glm130b.finetune.scores).
Details (JSON) go to $OUT/bench_finetune.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from run_info import commit, device_name
from suite_summary import figure, write_summary

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import load_model
from glm130b.evaluate.config import task_from_mapping
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.runner import evaluate_task
from glm130b.finetune.config import FinetuneConfig
from glm130b.finetune.records import read_records
from glm130b.finetune.runner import apply_method, run_finetune
from glm130b.finetune.scores import exact_match
from glm130b.finetune.toy_task import METHOD_RUNS, RUN, build_toy_task
from glm130b.model.initialization import initialize_glm
from glm130b.objective.batch import TrainingBatch
from glm130b.quant.linear import quantize_model
from glm130b.train.optim import build_optimizer
from glm130b.train.step import forward_backward

# (warmup, timed) steps; --small only checks the script, so it times few
STEPS = {False: (3, 10), True: (1, 3)}
TOY_GOAL_PERCENT = 90  # issue 17: every method takes the toy task's exact match to >= 90 %
GIB = 2**30


def speed_config(small: bool) -> GLMConfig:
    if small:
        return GLMConfig(
            num_layers=4,
            hidden_size=256,
            num_attention_heads=4,
            vocab_size=16384,
            inner_hidden_size=640,
            max_sequence_length=256,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    return GLMConfig.from_preset("glm-1b", hidden_dropout=0.0, attention_dropout=0.0)


def prefix_lm_batch(rows: int, length: int, vocab: int) -> TrainingBatch:
    """Random tokens; the first half of each row is the bidirectional prompt, the second is scored."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.arange(length) < length // 2
    return TrainingBatch(
        input_ids=torch.randint(0, vocab, (rows, length), generator=g),
        position_ids=torch.arange(length).expand(rows, length),
        targets=torch.randint(0, vocab, (rows, length), generator=g),
        loss_mask=(~prompt).float().expand(rows, length),
        segment_ids=torch.ones(rows, length, dtype=torch.long),
        in_prefix=prompt.expand(rows, length),
    )


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_sums(model: torch.nn.Module) -> dict[str, float]:
    """A float64 sum per parameter and buffer: a cheap fingerprint (a copy would count in peak memory)."""
    return {name: t.detach().sum(dtype=torch.float64).item() for name, t in model.state_dict(keep_vars=True).items()}


def measure_method(case: str, small: bool, device: torch.device) -> dict:
    """Build the model for `case`, train the warmup and timed steps; runs in a process of its own."""
    warmup, timed = STEPS[small]
    fields, _ = METHOD_RUNS[case]
    cfg = speed_config(small)
    rows, length = (2, 256) if small else (1, 2048)
    ft = FinetuneConfig.from_dict(
        {
            **fields,
            "train": {
                "device": device.type,
                "micro_batch_size": rows,
                "global_batch_size": rows,
                "sequence_length": length,
            },
        }
    )
    train = ft.train_config(cfg, num_sequences=1000)
    before = resident_bytes()
    with torch.device(device):
        model = GLM(cfg)
    initialize_glm(model, seed=0)
    if ft.method != "full" and train.precision != "fp32":
        model.to(torch.bfloat16)  # a frozen base sits in the compute dtype (runner.prepare_model)
    apply_method(model, ft, seed=0)
    optimizer = build_optimizer(model, train)
    batch = prefix_lm_batch(rows, length, cfg.vocab_size)
    before_sums = tensor_sums(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + timed):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        forward_backward(model, [batch], train.precision)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    )
    after_sums = tensor_sums(model)
    trained = {name for name, t in model.state_dict(keep_vars=True).items() if t.requires_grad}  # tied: both names
    frozen_changed = [n for n in before_sums if n not in trained and before_sums[n] != after_sums[n]]
    trained_still = [n for n in trained if before_sums[n] == after_sums[n]]
    if frozen_changed or trained_still:  # adapters must leave the base bit-identical, and every trained tensor move
        raise SystemExit(
            f"{case}: frozen tensors changed {frozen_changed[:3]}, trained ones did not {trained_still[:3]}"
        )
    return {
        "method": case,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_bytes": peak,
        "steps_per_s": timed / seconds,
        "tokens_per_s": timed * rows * length / seconds,
        "precision": train.precision,
        "tokens_per_step": rows * length,
    }


def toolkit_exact_match(model, tokenizer, held: list, root: Path) -> float:
    """Exact match (percent) of `model` on the held-out records through the evaluation toolkit: the
    records as a `gen` task file ([gMASK] after the prompt, greedy, SQuAD-style EM), scored by
    glm130b.evaluate.runner.evaluate_task, as `glm130b evaluate` would score them."""
    task_dir = root / "toolkit" / "toy"
    task_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"inputs_pretokenized": r.prompt, "targets_pretokenized": [r.target]}) for r in held]
    (task_dir / "held.jsonl").write_text("\n".join(lines) + "\n")
    config = task_from_mapping(
        {
            "name": "toy-shift",
            "type": "gen",
            "path": "toy",
            "metrics": ["EM"],
            "use_task_mask": True,
            "max_seq_length": model.config.max_sequence_length,
            "max_gen_length": 8,  # a toy word is at most a few tokens, then <eop>
            "no_repeat_ngram_size": 0,  # a shifted word may repeat letters
        },
        "bench_finetune toy task",
    )
    result = evaluate_task(config, root / "toolkit", model, tokenizer, Executor(progress=False))
    return result["metrics"]["EM"]["value"]  # the toolkit reports EM in percent


def toy_quality(device: torch.device, root: Path) -> list[dict]:
    start = time.perf_counter()
    task = build_toy_task(root, device=device.type)
    print(f"toy task base built in {time.perf_counter() - start:.0f} s", flush=True)
    held = read_records(task.held)
    results = []
    for case, (fields, train) in METHOD_RUNS.items():
        config = FinetuneConfig.from_dict(
            {
                "model": str(task.base),
                "data": str(task.train),
                "valid_data": str(task.held),
                "out_dir": str(root / case),
                **fields,
                "train": {**RUN, **train, "device": device.type, "precision": "fp32"},
            }
        )
        base = load_model(task.base, device=device)
        if config.scheme is not None:
            quantize_model(base, config.scheme)
        before = exact_match(base, task.tokenizer, held)
        toolkit_before = toolkit_exact_match(base, task.tokenizer, held, root / case)
        start = time.perf_counter()
        result = run_finetune(config, show_progress=False)
        seconds = time.perf_counter() - start
        toolkit_after = toolkit_exact_match(result.model.eval(), task.tokenizer, held, root / case)
        results.append(
            {
                "method": case,
                "trained_parameters": result.trainable_parameters,
                "steps": train["train_samples"] // RUN["global_batch_size"],
                "lr": train["lr"],
                "exact_match_before": before,
                "exact_match_after": result.exact_match,
                "toolkit_em_before": toolkit_before,
                "toolkit_em_after": toolkit_after,
                "run_seconds": seconds,
            }
        )
        print(results[-1], flush=True)
    return results


def tables(device: torch.device, small: bool, speed: list[dict], quality: list[dict]) -> str:
    cfg = speed_config(small)
    first = speed[0]
    text = (
        f"### Fine-tuning (issue 17): {device_name(device)}, torch {torch.__version__}, commit {commit()}"
        f"{' (--small: toy sizes, not a speed figure)' if small else ''}\n\n"
        f"Same model for every method: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocabulary "
        f"{cfg.vocab_size} ({first['parameters'] / 1e6:.0f} M parameters), {first['tokens_per_step']} tokens "
        f"a step, {first['precision']}; {STEPS[small][1]} steps timed after {STEPS[small][0]}. Peak memory: "
        + (
            "torch.cuda.max_memory_allocated."
            if device.type == "cuda"
            else "resident memory over the process's before the model was built."
        )
        + "\n\n"
        "| method | trained parameters | peak memory (GiB) | steps/s | tokens/s |\n|---|---|---|---|---|\n"
    )
    text += "".join(
        f"| {r['method']} | {r['trained_parameters']:,} | {r['peak_bytes'] / GIB:.2f} | "
        f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} |\n"
        for r in speed
    )
    if not quality:
        return text
    text += (
        "\nToy task (glm130b.finetune.toy_task), fp32, exact match on 100 held-out words: the fine-tune's "
        "own greedy check (glm130b.finetune.scores) and the evaluation toolkit's EM (the held-out records "
        "as a `gen` task through glm130b.evaluate, as `glm130b evaluate` scores them):\n\n"
        "| method | trained parameters | steps | lr | exact match before | after | toolkit EM before | after | run (s) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    text += "".join(
        f"| {r['method']} | {r['trained_parameters']:,} | {r['steps']} | {r['lr']:g} | "
        f"{r['exact_match_before']:.0f} % | {r['exact_match_after']:.0f} % | "
        f"{r['toolkit_em_before']:.0f} % | {r['toolkit_em_after']:.0f} % | {r['run_seconds']:.1f} |\n"
        for r in quality
    )
    return text


def summary_rows(speed: list[dict], quality: list[dict]) -> list[dict]:
    """The GPU suite's rows: per method steps/s (against full fine-tuning), peak memory, and the toy
    task's exact match after fine-tuning against the base's."""
    full = next(r for r in speed if r["method"] == "full")
    rows = []
    for r in speed:
        rows.append(figure(f"steps/s, {r['method']}", r["steps_per_s"], "steps/s", None, "full", full["steps_per_s"]))
        rows.append(
            figure(
                f"peak memory, {r['method']}",
                r["peak_bytes"] / GIB,
                "GiB",
                None,
                "full",
                full["peak_bytes"] / GIB,
                False,
            )
        )
    for r in quality:
        rows.append(
            figure(
                f"toy exact match, {r['method']}",
                r["exact_match_after"] / 100,
                "%",
                TOY_GOAL_PERCENT / 100,
                "before",
                r["exact_match_before"] / 100,
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes (checks the script, not the speed)")
    parser.add_argument("--append", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument(
        "--no-toy",
        action="store_true",
        help="speed and memory only (the GPU suite: the toy task's fp32 scores are the CPU run's, minutes there)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    if args.one:
        print(json.dumps(measure_method(args.one, args.small, device)))
        return 0

    quality = []
    if not args.no_toy:
        with tempfile.TemporaryDirectory() as root:
            quality = toy_quality(device, Path(root))
    failed = [r["method"] for r in quality if r["exact_match_after"] < TOY_GOAL_PERCENT]
    if failed:
        print(f"toy task: exact match below {TOY_GOAL_PERCENT} % after fine-tuning: {', '.join(failed)}")
        return 1
    speed = []
    for case in METHOD_RUNS:
        command = [sys.executable, __file__, "--one", case, "--device", args.device] + (
            ["--small"] if args.small else []
        )
        speed.append(json.loads(subprocess.check_output(command, text=True).strip().splitlines()[-1]))
        print(speed[-1], flush=True)
    write_summary("finetune", summary_rows(speed, quality))
    text = tables(device, args.small, speed, quality)
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_finetune.json").write_text(
            json.dumps(
                {
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "commit": commit(),
                    "speed": speed,
                    "quality": quality,
                },
                indent=2,
            )
        )
    if args.append:
        results = Path(__file__).parent / "RESULTS.md"
        results.write_text(results.read_text().rstrip("\n") + "\n\n" + text)
    print()
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
