"""Continuous batching in `glm130b serve` (GitHub issue 13): throughput and latency at concurrency
1, 8 and 32 against the same server answering the same kind of requests one at a time.

  python benchmarks/bench_serve.py --size small --threads 1   # CPU: 4 x 256, compute-bound at batch 32
  python benchmarks/bench_serve.py --size tiny --threads 1    # CPU: 2 x 64, per-step overhead dominates
  python benchmarks/bench_serve.py --device cuda              # GPU: a ~1.2B GLM in bf16
  add --append to append the table to benchmarks/RESULTS.md

The server is the real one (`python -m glm130b.cli serve`, a subprocess, 32 cache rows), the load
a minimal asyncio HTTP/1.1 client in this process: a closed loop of C workers on C keep-alive
connections, each sending its next request when its previous one is answered. Every request is a distinct prompt of PROMPT_TOKENS
letters + [gMASK] and asks for NEW_TOKENS tokens with `ignore_eos` (so every answer has the same
length), greedy, not streamed. Concurrency 1 is the baseline: the same engine serving one request
at a time (it then computes one cache row per step). Goal at concurrency 32: >= 8x the baseline's
tokens/s with p99 latency under 2x the baseline's median latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # suite_summary, beside this file
import httpx
import torch
from suite_summary import figure, write_summary  # noqa: E402

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import save_model
from glm130b.model.config import PRESETS
from glm130b.tokenizer.tokenizers import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_BATCH = 32
GOAL_SPEEDUP, GOAL_P99 = 8.0, 2.0


SIZES = {  # CPU sizes: a minute per run on two cores; "1b" is bench_generation.py's ~1.2B GPU shape
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=160, max_sequence_length=128),
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, inner_hidden_size=640, max_sequence_length=128),
    "1b": {**PRESETS["glm-1b"], "max_sequence_length": 512},
}


def write_model(directory: Path, size: str) -> str:
    """A random-weight GLM (the answers do not matter, only the work) and a character tokenizer."""
    texts = ["".join(random.Random(i).choice(LETTERS) for _ in range(40)) for i in range(200)]
    # 256 byte pieces + 3 controls + one per letter: a character-level tokenizer, 8 specials on top
    tokenizer = train_tokenizer(texts, directory / "tokenizer", vocab_size=256 + 3 + len(LETTERS) + 8, num_threads=1)
    cfg = GLMConfig(**{"vocab_size": tokenizer.vocab_size, **SIZES[size]}, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GLM(cfg)
    save_model(model if size != "1b" else model.to(torch.bfloat16), directory)
    return directory.name


def start_server(model_dir: Path, port: int, device: str, threads: int | None) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "glm130b.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        device,
        "--max-batch",
        str(MAX_BATCH),
        "--max-queue",
        str(4 * MAX_BATCH),
        "--log-level",
        "warning",
    ]
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(command, env=env)


def wait_for(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


class Connection:
    """One keep-alive HTTP/1.1 connection posting JSON: a few lines of asyncio instead of an HTTP
    client library, so that the load generator's own CPU time (~0.1 ms a request instead of httpx's
    ~2 ms) does not weigh on the 2-core machine the server shares with it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        payload = json.loads(await self.reader.readexactly(int(headers["content-length"])))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload}")
        return payload

    def close(self) -> None:
        self.writer.close()


async def load(
    port: int, model: str, concurrency: int, requests: int, prompt_tokens: int, new_tokens: int, seed: int
) -> dict:
    """A closed loop of `concurrency` workers, one connection each, sending `requests` requests in all."""
    rng = random.Random(seed)
    prompts = ["".join(rng.choice(LETTERS) for _ in range(prompt_tokens)) for _ in range(requests)]
    latencies, tokens = [], 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    connections = [await Connection.open("127.0.0.1", port) for _ in range(concurrency)]

    async def worker(connection: Connection):
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            started = time.perf_counter()
            answer = await connection.post(
                "/v1/completions",
                {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": new_tokens, "ignore_eos": True},
            )
            latencies.append(time.perf_counter() - started)
            tokens += answer["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - started
    for c in connections:
        c.close()
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| concurrency | requests | tokens/s | vs one at a time | p50 latency | p99 latency | p99 / single p50 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {1000 * r['p50_s']:,.0f} ms | "
            f"{1000 * r['p99_s']:,.0f} ms | {r['p99_s'] / base['p50_s']:.2f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    try:
        commit = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, Python {platform.python_version()}, commit {commit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="1b", help="model size (tiny and small: CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads of the server (default: torch's choice)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256, help="requests at concurrency 8 and 32 (8 rounds of 32)")
    parser.add_argument("--single-requests", type=int, default=32, help="requests at concurrency 1")
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--small", action="store_true", help="a quick CPU check: tiny model, few requests")
    args = parser.parse_args()
    if args.small:
        args.size, args.threads, args.requests, args.single_requests, args.new_tokens = "tiny", 1, 64, 8, 8
    url = f"http://127.0.0.1:{args.port}"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / f"glm-bench-{args.size}"
        name = write_model(model_dir, args.size)
        server = start_server(model_dir, args.port, args.device, args.threads)
        try:
            wait_for(url, server)
            # warm-up: every batch size once (the first step at a new shape allocates)
            asyncio.run(load(args.port, name, MAX_BATCH, 2 * MAX_BATCH, args.prompt_tokens, args.new_tokens, seed=99))
            rows = [
                asyncio.run(load(args.port, name, 1, args.single_requests, args.prompt_tokens, args.new_tokens, seed=1))
            ]
            for c in (8, 32):
                rows.append(
                    asyncio.run(
                        load(args.port, name, c, max(args.requests, c), args.prompt_tokens, args.new_tokens, seed=c)
                    )
                )
        finally:
            server.terminate()
            server.wait(timeout=120)
    at32 = rows[-1]
    speedup, p99 = at32["tokens_per_s"] / rows[0]["tokens_per_s"], at32["p99_s"] / rows[0]["p50_s"]
    verdict = (
        f"At concurrency 32: {speedup:.1f}x the one-at-a-time throughput (goal >= {GOAL_SPEEDUP:g}x: "
        f"{'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}), p99 latency {p99:.2f}x the single request's "
        f"median (goal < {GOAL_P99:g}x: {'met' if p99 < GOAL_P99 else 'NOT met'})."
    )
    shape = SIZES[args.size]
    size = (
        f"{args.size} GLM ({shape['num_layers']} x {shape['hidden_size']}), "
        f"{'bf16' if args.size == '1b' else 'fp32'}, random weights"
    )
    load_after = os.getloadavg()[0]  # the machine may be shared: other work slows some rows more than others
    text = (
        f"{machine()}, 1-minute load average {load_before:.1f} before / {load_after:.1f} after; "
        f"{size} on {args.device}, threads {args.threads or 'default'}; prompts of "
        f"{args.prompt_tokens} tokens + [gMASK], {args.new_tokens} new tokens each (ignore_eos), greedy, "
        f"{MAX_BATCH} cache rows\n\n{table(rows)}\n\n{verdict}\n"
    )
    print(text)
    write_summary(
        "serve",
        [
            figure("tokens/s at concurrency 32 over one at a time", speedup, "x", GOAL_SPEEDUP),
            figure(
                "p99 latency at concurrency 32 over one request's median", p99, "x", GOAL_P99, higher_is_better=False
            ),
        ],
    )
    if args.append:
        results = ROOT / "benchmarks" / "RESULTS.md"
        heading = "## Serving: continuous batching (benchmarks/bench_serve.py, issue 13)"
        with open(results, "a") as f:
            if heading not in results.read_text():
                f.write(f"\n{heading}\n")
            f.write(f"\n### {args.size} model on {args.device}\n\n{text}")


if __name__ == "__main__":
    main()
