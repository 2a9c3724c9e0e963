"""Decoding speed of glm130b.generate (GitHub issue 6), at batch 1 and 8.

  python benchmarks/bench_generation.py                  # the GPU run: checks, then a Markdown table
  python benchmarks/bench_generation.py --small --device cpu   # the same code at toy sizes
  python benchmarks/bench_generation.py --append         # also append the table to benchmarks/RESULTS.md

Cases:
1. The full GLM-130B architecture (70 layers, hidden 12288, vocab 150528) with INT4 row-wise
   weights, at batch 1 on one GPU. The model is built on the meta device and its QuantizedLinear
   buffers are allocated on the GPU and filled with random bytes there: no fp16 copy of the linear
   weights ever exists (they would need 254 GB). Reported: tokens/s and the bandwidth achieved
   over the bytes one decode step reads (every weight byte, the embedding as the output head, the
   KV cache slots). Goal: 40 tokens/s on an H200 (the bandwidth bound is ~63, ANCHORS.md).
2. A ~1.2B GLM (18 layers, hidden 2048, GLM-130B's vocabulary) in bf16 and INT4, batch 1 and 8,
   against Hugging Face transformers' `generate` on a Llama of about the same size with random
   weights, measured in the same run (skipped when transformers is not installed). Goal: 1000
   tokens/s at batch 1 in bf16.

Every row: a 32-token prompt + [gMASK] + <sop>, 128 new tokens (end tokens banned so every run
generates all 128), greedy, the decode step compiled (CUDA graphs). tokens/s counts all generated
tokens of the batch over the whole call (prefill included, as `generate` measures it); decode
tokens/s times the decode steps alone, inside the same call. Correctness checks run first, at
small size, and must pass.
Details (JSON) go to $OUT/bench_generation.json when $OUT is set.
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
from run_info import commit, device_name
from suite_summary import figure, write_summary

from glm130b import GLM, GLMConfig
from glm130b.generate.decode import banned_tokens, end_tokens, generate_ids, iterate_tokens, new_cache, prefill
from glm130b.generate.inputs import build_generation_batch
from glm130b.generate.strategies import Greedy
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import QuantizedLinear, replace_linears
from glm130b.tokenizer.specials import GLM130B_TOKENS as TOKENS

PROMPT_TOKENS = 32
NEW_TOKENS = 128


# ---------------------------------------------------------------------------------- models
def random_int4_glm(config: GLMConfig, device: torch.device, dtype: torch.dtype, group_size: int | None = None) -> GLM:
    """A GLM whose four block linears are INT4 QuantizedLinear filled with random bytes on `device`.

    Meta first (no memory), float parts cast while still on meta, then the linears swapped for
    empty QuantizedLinear, then `to_empty` allocates everything on the device, and the values are
    drawn there in place."""
    with torch.device("meta"):
        model = GLM(config).to(dtype)
    replace_linears(model, QuantScheme(4, group_size))
    model.to_empty(device=device)
    _init_float_parts(model, config)
    # Row scales such that the dequantized weights have std ~ 0.02 / sqrt(hidden / 1024), as an
    # initialised model's would: uniform int4 values have std ~4.6.
    scale = 0.02 / 4.6 / max(1.0, (config.hidden_size / 1024) ** 0.5)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.weight.random_(-128, 128)  # int8 bytes = two random int4 values each
            module.weight_scale.fill_(scale)
    return model.eval()


def random_float_glm(config: GLMConfig, device: torch.device, dtype: torch.dtype) -> GLM:
    with torch.device("meta"):
        model = GLM(config).to(dtype)
    model.to_empty(device=device)
    _init_float_parts(model, config)
    with torch.no_grad():
        for block in model.transformer.layers:
            for linear in (
                block.attention.query_key_value,
                block.attention.dense,
                block.mlp.dense_h_to_4h,
                block.mlp.dense_4h_to_h,
            ):
                linear.weight.normal_(0.0, 0.02)
    return model.eval()


@torch.no_grad()
def _init_float_parts(model: GLM, config: GLMConfig) -> None:
    for name, param in model.named_parameters():
        if "layernorm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
    model.transformer.word_embeddings.weight.normal_(0.0, 0.0052)  # GLM-130B's embedding init


def bytes_per_step(model: GLM, cache_slots: int, batch: int) -> int:
    """Bytes one decode step reads: every parameter and buffer once (the embedding is read whole as
    the tied output head; its lookup row is negligible), plus the K and V of every cache slot (the
    static-shape step attends over all of them)."""
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    cfg = model.config
    dtype_bytes = model.transformer.word_embeddings.weight.element_size()
    cache = 2 * cfg.num_layers * batch * cache_slots * cfg.hidden_size * dtype_bytes
    return weights + cache


# ---------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def prompts(batch: int, vocab_low: int, vocab_high: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_low, vocab_high, (batch, PROMPT_TOKENS), generator=g).tolist()
    return [row + [TOKENS.gmask, TOKENS.sop] for row in ids]


def bench_glm(model: GLM, batch: int, new_tokens: int, repeats: int, compile: bool) -> dict:
    device = model.transformer.word_embeddings.weight.device
    contexts = prompts(batch, 100, 20000)
    banned = banned_tokens(TOKENS, model.config.vocab_size, 150008) + end_tokens(TOKENS)
    run = lambda: generate_ids(model, contexts, TOKENS, Greedy(), new_tokens, banned=banned, compile=compile)
    start = time.perf_counter()
    out = run()  # compiles (and captures the CUDA graph) on the first call
    sync(device)
    warmup = time.perf_counter() - start
    assert all(len(row) == new_tokens for row in out), "every row must generate all tokens"
    total = statistics.median(timed(run, device, repeats))
    cache = new_cache(model, batch, len(contexts[0]) + new_tokens)
    with torch.no_grad():
        prefill_s = statistics.median(timed(lambda: prefill(model, cache, contexts, TOKENS), device, repeats))
    slots = cache.max_length

    def decode_seconds() -> float:
        """The decode steps of one call, timed inside it (the generator's first token comes after
        the prefill): a difference of two medians, total - prefill, went negative on a busy CPU."""
        steps = iterate_tokens(model, contexts, TOKENS, Greedy(), new_tokens, banned, compile)
        next(steps)
        sync(device)
        start = time.perf_counter()
        for _ in steps:
            pass
        sync(device)
        return time.perf_counter() - start

    decode_s = statistics.median(decode_seconds() for _ in range(repeats)) / (new_tokens - 1)
    step_bytes = bytes_per_step(model, slots, batch)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds": total,
        "tokens_per_s": batch * new_tokens / total,
        "decode_tokens_per_s": batch / decode_s,
        "prefill_s": prefill_s,
        "warmup_s": warmup,
        "bytes_per_step": step_bytes,
        "bandwidth_GBps": step_bytes / decode_s / 1e9,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def bench_hf(batch: int, new_tokens: int, repeats: int, device, small: bool) -> dict | None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM  # deferred: the optional baseline (bench extra)
    except ImportError:
        return None
    if small:
        cfg = LlamaConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1024,
            tie_word_embeddings=True,
        )
    else:  # Llama-3.2-1B's shape: 1.24B parameters
        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    ids = torch.randint(100, cfg.vocab_size - 100, (batch, PROMPT_TOKENS), device=device)
    run = lambda: model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.no_grad():
        run()
        total = statistics.median(timed(run, device, repeats))
    n = sum(p.numel() for p in model.parameters())
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds": total,
        "tokens_per_s": batch * new_tokens / total,
        "parameters": n,
    }


# ---------------------------------------------------------------------------------- checks
def correctness_checks(device: torch.device, compile: bool) -> list[str]:
    """At small size on the benchmark device, in fp32: the static-cache decode (eager and
    compiled) gives the greedy tokens of a loop of full forwards; INT4 decoding runs end to end."""
    torch.manual_seed(0)
    cfg = GLMConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        vocab_size=150528,
        inner_hidden_size=256,
        max_sequence_length=256,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = random_float_glm(cfg, device, torch.float32)
    with torch.no_grad():
        model.transformer.word_embeddings.weight.normal_(0.0, 1.0)  # peaked distributions: no near-ties
    contexts = [prompts(1, 100, 20000, seed=s)[0][s:] for s in range(3)]  # three lengths
    banned = banned_tokens(TOKENS, cfg.vocab_size, 150008) + end_tokens(TOKENS)
    steps = 8
    expected = []
    for context in contexts:
        seq = list(context)
        for _ in range(steps):
            batch = build_generation_batch([seq], TOKENS)
            with torch.no_grad():
                logits = model(
                    batch.input_ids.to(device), batch.position_ids.to(device), batch.attention_mask.to(device)
                )[0, -1].float()
            logits[banned] = float("-inf")
            seq.append(int(logits.argmax()))
        expected.append(seq[len(context) :])
    lines = []
    for label, use_compile in (("eager", False), ("compiled", True)) if compile else (("eager", False),):
        got = generate_ids(model, contexts, TOKENS, Greedy(), steps, banned=banned, compile=use_compile)
        ok = got == expected
        lines.append(
            f"{'PASS' if ok else 'FAIL'}: static-cache decode ({label}) == full-forward greedy, batch of 3 lengths"
        )
        if not ok:
            raise SystemExit("\n".join(lines) + f"\n  got {got}\n  expected {expected}")
    int4 = random_int4_glm(cfg, device, torch.float16 if device.type == "cuda" else torch.float32)
    out = generate_ids(int4, contexts, TOKENS, Greedy(), steps, banned=banned, compile=compile)
    ok = all(len(row) == steps for row in out)
    lines.append(f"{'PASS' if ok else 'FAIL'}: INT4 model decodes {steps} tokens per row")
    if not ok:
        raise SystemExit("\n".join(lines))
    return lines


# ---------------------------------------------------------------------------------- main
def glm_1b_config(small: bool) -> GLMConfig:
    if small:
        return GLMConfig(
            num_layers=2,
            hidden_size=128,
            num_attention_heads=4,
            vocab_size=150528,
            inner_hidden_size=352,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    return GLMConfig.from_preset("glm-1b", hidden_dropout=0.0, attention_dropout=0.0)


def glm_130b_config(small: bool) -> GLMConfig:
    if small:
        return GLMConfig(
            num_layers=2,
            hidden_size=256,
            num_attention_heads=2,
            vocab_size=150528,
            inner_hidden_size=640,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    return GLMConfig.from_preset("glm-130b", hidden_dropout=0.0, attention_dropout=0.0)


def suite_figures(rows: list[tuple[str, dict]], small: bool) -> list[dict]:
    """The suite's headline figures (benchmarks/gpu_suite.sh): GLM-130B INT4 decode at batch 1
    (goal 40 tokens/s; no baseline runs in the same process: ANCHORS.md puts the official path at
    ~4.5), and the 1.2B bf16/fp32 model at batch 1 against transformers' generate (goal 1000)."""
    size = " (small: toy sizes)" if small else ""
    found = {(name.split(" (")[0], r["batch"]): r for name, r in rows}
    out = []
    r = found.get(("GLM-130B arch, INT4 row-wise", 1))
    if r:
        out.append(figure(f"GLM-130B INT4 decode, batch 1{size}", r["decode_tokens_per_s"], "tokens/s", 40.0))
    glm = next(
        (r for (name, b), r in found.items() if name.startswith("GLM 1.2B") and "INT4" not in name and b == 1), None
    )
    hf = found.get(("Llama 1.24B bf16, transformers generate()", 1))
    if glm:
        out.append(
            figure(
                f"GLM 1.2B generate, batch 1, {glm['new_tokens']} new tokens{size}",
                glm["tokens_per_s"],
                "tokens/s",
                1000.0,
                "transformers generate, Llama 1.24B",
                hf["tokens_per_s"] if hf else None,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes (checks the script, not the speed)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip-130b", action="store_true")
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--skip-1b-int4", action="store_true", help="the 1.2B model in bf16 only")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the 1.2B rows and their baseline")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    compile = not args.no_compile
    new_tokens = min(args.new_tokens, 16) if args.small else args.new_tokens
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))

    for line in correctness_checks(device, compile):
        print(line, flush=True)

    rows: list[tuple[str, dict]] = []
    if not args.skip_130b:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        model = random_int4_glm(glm_130b_config(args.small), device, dtype)
        rows.append(("GLM-130B arch, INT4 row-wise (glm130b)", bench_glm(model, 1, new_tokens, args.repeats, compile)))
        print(rows[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_1b:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cfg = glm_1b_config(args.small)
        float_name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
        batches = [int(b) for b in args.batches.split(",")]
        builds = [
            (float_name, lambda: random_float_glm(cfg, device, dtype)),
            ("INT4 row-wise", lambda: random_int4_glm(cfg, device, dtype)),
        ][: 1 if args.skip_1b_int4 else 2]
        for label, build in builds:
            model = build()
            for batch in batches:
                rows.append((f"GLM 1.2B {label} (glm130b)", bench_glm(model, batch, new_tokens, args.repeats, compile)))
                print(rows[-1], flush=True)
            del model
        for batch in batches:
            result = bench_hf(batch, new_tokens, args.repeats, device, args.small)
            if result is None:
                print("transformers is not installed: the Hugging Face baseline is skipped", flush=True)
                break
            rows.append(("Llama 1.24B bf16, transformers generate()", result))
            print(rows[-1], flush=True)

    header = (
        f"### Generation (issue 6): {device_name(device)}, torch {torch.__version__}, commit {commit()}"
        f"{' (--small: toy sizes, not a speed figure)' if args.small else ''}\n\n"
        f"Prompt {PROMPT_TOKENS} tokens, {new_tokens} new tokens, greedy, decode step "
        f"{'compiled (CUDA graphs on the GPU)' if compile else 'eager'}.\n\n"
        "| model | params | batch | tokens/s | decode tokens/s | GB/s achieved (decode) |\n"
        "|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {name} | {r['parameters'] / 1e9:.2f}B | {r['batch']} | {r['tokens_per_s']:.1f} | "
        f"{r.get('decode_tokens_per_s', float('nan')):.1f} | "
        f"{r['bandwidth_GBps']:.4g} |\n"
        if "bandwidth_GBps" in r
        else f"| {name} | {r['parameters'] / 1e9:.2f}B | {r['batch']} | {r['tokens_per_s']:.1f} | - | - |\n"
        for name, r in rows
    )
    table = header + body
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_generation.json").write_text(
            json.dumps(
                {
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "commit": commit(),
                    "rows": [{"name": n, **r} for n, r in rows],
                },
                indent=2,
            )
        )
    write_summary("generation", suite_figures(rows, args.small))
    if args.append:
        results = Path(__file__).parent / "RESULTS.md"
        text = results.read_text() if results.exists() else "# Benchmark results\n"
        results.write_text(text.rstrip("\n") + "\n\n" + table)
    print()
    print(table, end="")


if __name__ == "__main__":
    sys.exit(main())
