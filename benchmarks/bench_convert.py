"""Peak host memory of checkpoint conversion on a synthetic multi-GB model, against loading every
official shard at once (what the official tools/convert_tp.py and inference scripts do).

    python benchmarks/bench_convert.py [--gb 2] [--append]

Each conversion runs in a fresh process; its peak resident memory (VmHWM) above the process's
resident size just before it is the figure. The model: fp16, layers of GLM shape, written lazily.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import save_config
from glm130b.checkpoint.safetensors import write_streaming

ROOT = Path(__file__).resolve().parents[1]
PROBE = textwrap.dedent("""
    import json, sys, threading, time, torch
    from glm130b.interop.convert import convert
    from glm130b.quant.format import QuantScheme
    def status(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024
    peak_anon, done = [0], threading.Event()
    def sample():  # anonymous memory has no high-water mark in /proc: sample it
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
            time.sleep(0.002)
    src, dst, how = sys.argv[1:4]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, anon_before = status("VmRSS:"), status("RssAnon:")
    threading.Thread(target=sample, daemon=True).start()
    if how == "load-all-shards":  # the official way: every rank file in memory, then merged
        shards = [torch.load(p, map_location="cpu", weights_only=True)["module"]
                  for p in sorted(__import__("pathlib").Path(src).glob("*/mp_rank_*"))]
    elif how == "int4":
        convert(src, dst, scheme=QuantScheme(4), progress=False)
    else:
        convert(src, dst, to=how.split(":")[0], tp=int(how.split(":")[1]), progress=False)
    done.set()
    peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
    print(json.dumps({"resident": status("VmHWM:") - before, "anonymous": peak_anon[0] - anon_before}))
""")


def synthetic_model(directory: Path, gigabytes: float) -> GLMConfig:
    """A GLM of GLM-130B's layer shape ratios at hidden 4096 with enough layers for `gigabytes` in fp16."""
    per_layer = 2 * (4 * 4096**2 + 3 * 4096 * 10880)
    layers = max(2, round(gigabytes * 1e9 / per_layer))
    config = GLMConfig(
        num_layers=layers, hidden_size=4096, num_attention_heads=32, vocab_size=32768, inner_hidden_size=10880
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GLM(config).state_dict().items()}
    pattern = torch.randn(2**20).half()
    tensors = (
        (n, pattern.repeat(-(-torch.Size(s).numel() // pattern.numel()))[: torch.Size(s).numel()].view(s))
        for n, s in shapes.items()
    )
    directory.mkdir(parents=True)
    write_streaming(
        directory / "model.safetensors",
        [(n, torch.float16, s) for n, s in shapes.items()],
        tensors,
        {"format": "glm130b"},
    )
    save_config(config, directory)
    return config


def measure(src: Path, dst: Path, how: str) -> dict:
    """Peak growth of resident memory (VmHWM: includes pages of memory-mapped input, which the
    kernel reclaims as page cache) and of anonymous memory (what the process itself holds)."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(src), str(dst), how],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "src")},
    )
    return json.loads(run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="model size in GB (fp16)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = synthetic_model(tmp / "dir", args.gb)
        total = (tmp / "dir" / "model.safetensors").stat().st_size
        largest = max(
            torch.Size(s).numel() * 2
            for s in [(config.vocab_size, config.hidden_size), (2 * config.inner_hidden_size, config.hidden_size)]
        )
        rows = [
            ("dir -> official TP 4", measure(tmp / "dir", tmp / "tp4", "official:4")),
            ("official TP 4 -> dir", measure(tmp / "tp4", tmp / "back", "dir:1")),
            ("dir -> dir INT4", measure(tmp / "dir", tmp / "int4", "int4")),
            ("baseline: load all 4 official shards", measure(tmp / "tp4", tmp / "unused", "load-all-shards")),
        ]
    lines = [
        f"### Checkpoint conversion peak memory ({total / 1e9:.2f} GB fp16 model, {config.num_layers} layers; "
        f"largest tensor {largest / 2**20:.0f} MiB)",
        "",
        f"torch {torch.__version__}, CPU; growth of a fresh process's peak memory: anonymous (what it holds; "
        "sampled every 2 ms) and resident (VmHWM, with the page cache of memory-mapped input).",
        "",
        "| conversion | anonymous peak (MiB) | x largest tensor | resident peak (MiB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {m['anonymous'] / 2**20:.0f} | {m['anonymous'] / largest:.1f} | {m['resident'] / 2**20:.0f} |"
        for name, m in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
