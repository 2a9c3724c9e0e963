"""Multiple-choice scoring speed of glm130b.evaluate (GitHub issue 11): items/s on MMLU 5-shot and
HellaSwag against lm-evaluation-harness's own Hugging Face backend (`HFLM`) on a Llama of the same
shape, measured in the same run on the same items.

  python benchmarks/bench_evaluate.py --small --device cpu      # toy sizes, a few minutes on 2 cores
  python benchmarks/bench_evaluate.py --device cuda             # the GPU run (bf16, a ~1.2B shape)
  python benchmarks/bench_evaluate.py ... --append              # also append the table to RESULTS.md

Paths, all fed the same (context, choice) requests built from shared/data/eval by the toolkit's
converters, both models with random weights and a byte-level vocabulary (same ids on both sides):
1. lm_eval HFLM over transformers' LlamaForCausalLM: causal scoring of context + choice; requests
   sharing a context with one-token choices (MMLU's letters) reuse one forward (its logits cache).
2. glm130b through lm_eval (glm130b.evaluate.harness.GLMHarnessLM): same requests, each context
   read once with all its choices packed after it.
3. glm130b's toolkit (glm130b.evaluate.multiple_choice): the same packing, single-token choice
   sets at one <sop>, straight from the task file.
Goal: path 3 >= 2x path 1. Needs lm-eval and transformers (the `eval` and `bench` extras).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from glm130b import GLM, GLMConfig
from glm130b.evaluate.config import task_from_mapping
from glm130b.evaluate.harness import GLMHarnessLM
from glm130b.evaluate.items import TaskFile, read_items
from glm130b.evaluate.multiple_choice import evaluate_file
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.suite import convert_english, convert_mmlu
from glm130b.tokenizer.specials import SpecialTokens

REPO = Path(__file__).resolve().parents[1]
SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"
BYTE_OFFSET = 8  # ids 0..7: GLM specials; bytes at 8..263
SPECIALS = SpecialTokens(mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6, pad=0)
VOCAB = BYTE_OFFSET + 256
# Rows of the models' embedding and output layer: Llama's real vocabulary size by default (both
# models, the byte ids among them; the rest are never read), or just the byte ids. A real vocabulary
# is what makes the output layer cost: lm-eval's HFLM computes it at every position, the toolkit at
# the scored ones only.
MODEL_VOCABS = {"llama": 32000, "bytes": VOCAB}
BATCH = 8
REPEATS = 5
SIZES = {  # (layers, hidden, heads, GeGLU/SwiGLU inner, context, MMLU items, HellaSwag items)
    "small": (2, 128, 4, 344, 1024, 24, 48),
    "cpu": (4, 256, 8, 688, 2048, 40, 80),
    "cuda": (24, 2048, 16, 5504, 2048, 400, 800),  # ~1.2B parameters
}


class ByteTokenizer:
    """UTF-8 bytes at ids 8..263, GLM specials below: the same ids as the Hugging Face tokenizer below."""

    specials = SPECIALS
    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - BYTE_OFFSET for i in ids if int(i) >= BYTE_OFFSET).decode("utf-8", errors="replace")


def hf_byte_tokenizer():
    """A transformers tokenizer giving the same ids as ByteTokenizer (bytes at 8..263)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {bytes_to_unicode()[b]: BYTE_OFFSET + b for b in range(256)}
    vocab.update({"<pad>": 0, "</s>": SPECIALS.eos})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character of every byte (what ByteLevel pre-tokenization emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def models(size: str, device: torch.device, dtype: torch.dtype, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, inner, context, _, _ = SIZES[size]
    torch.manual_seed(0)
    # fp32 rotary tables, as Llama's: half-precision elementwise work is slow on a CPU (same values on a GPU).
    glm = (
        GLM(
            GLMConfig(
                num_layers=layers,
                hidden_size=hidden,
                num_attention_heads=heads,
                vocab_size=vocab,
                inner_hidden_size=inner,
                max_sequence_length=context,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                rotary_dtype="fp32",
            )
        )
        .to(device, dtype)
        .eval()
    )
    llama = (
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=inner,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                max_position_embeddings=context,
                tie_word_embeddings=True,
                pad_token_id=0,
                eos_token_id=SPECIALS.eos,
                bos_token_id=SPECIALS.eos,
                attn_implementation="sdpa",
            )
        )
        .to(device, dtype)
        .eval()
    )
    return glm, llama


def task_items(source: Path, work: Path, name: str, count: int):
    """The first `count` items of the converted task (MMLU: taken evenly over the subjects)."""
    if name == "MMLU":
        files = sorted(p for p in convert_mmlu(source, work))
        per_file = -(-count // len(files))
        items = [item for f in files for item in read_items(f, "mul", ByteTokenizer(), per_file).items][:count]
    else:
        path = next(p for p in convert_english(source, work) if "hellaswag" in str(p))
        items = read_items(path, "mul", ByteTokenizer(), count).items
    return items


def requests_of(items):
    from lm_eval.api.instance import Instance

    tok = ByteTokenizer()
    out = []
    for i, item in enumerate(items):
        context = tok.decode(item.context)
        for c, choice in enumerate(item.choice_texts):
            out.append(Instance("loglikelihood", {}, (context, choice), c, metadata=("bench", i, 1)))
    return out


class TokenCounter:
    """Counts the token positions (padding included) a model is run on."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.count += (args[0] if args else kwargs["input_ids"]).numel()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times(paths: dict, device: torch.device, repeats: int = REPEATS) -> dict[str, tuple[float, float]]:
    """Best wall time and best process CPU time of each path over `repeats` rounds, the paths
    interleaved within a round so that a busy moment of a shared machine does not fall on one path
    only. On a shared CPU the CPU time is the steadier figure (other jobs do not add to it)."""
    best = {name: (float("inf"), float("inf")) for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def run(size: str, device: torch.device, source: Path, vocab: int) -> tuple[list[list], dict]:
    from lm_eval.models.huggingface import HFLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    glm, llama = models(size, device, dtype, vocab)
    sample = "Answer: (A) 答案 é\n"
    hf_tokenizer = hf_byte_tokenizer()
    assert hf_tokenizer.encode(sample, add_special_tokens=False) == ByteTokenizer().encode(sample), "tokenizers differ"
    hf = HFLM(pretrained=llama, tokenizer=hf_tokenizer, batch_size=BATCH, device=str(device), max_length=SIZES[size][4])
    ours_via_harness = GLMHarnessLM(loaded=(glm, ByteTokenizer()), batch_size=BATCH)
    hf_counter, glm_counter = TokenCounter(llama), TokenCounter(glm)
    rows, details = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, count in (("MMLU", SIZES[size][5]), ("HellaSwag", SIZES[size][6])):
            items = task_items(source, Path(tmp), name, count)
            requests = requests_of(items)
            config = task_from_mapping(
                {"name": name, "type": "mul", "path": ".", "micro-batch-size": BATCH, "max_seq_length": SIZES[size][4]},
                "bench",
            )
            task_file = TaskFile(Path(name), "", items)
            executor = Executor(progress=False)
            paths = {
                "lm-eval HFLM, Llama (baseline)": lambda r=requests: hf.loglikelihood(r, disable_tqdm=True),
                "glm130b via lm-eval (GLMHarnessLM)": lambda r=requests: ours_via_harness.loglikelihood(
                    r, disable_tqdm=True
                ),
                "glm130b toolkit (packed)": lambda f=task_file, c=config, e=executor: evaluate_file(
                    f, c, glm, ByteTokenizer(), e
                ),
            }
            counters = {"lm-eval HFLM, Llama (baseline)": hf_counter}
            with torch.no_grad():
                hf.loglikelihood(requests[:8], disable_tqdm=True)  # warm-up
                tokens = {}
                for path, fn in paths.items():  # one counted run each
                    counter = counters.get(path, glm_counter)
                    counter.count = 0
                    fn()
                    tokens[path] = counter.count
                times = best_times(paths, device)
            base_wall, base_cpu = (len(items) / t for t in times["lm-eval HFLM, Llama (baseline)"])
            for path, (wall, cpu) in times.items():
                rate, per_cpu = len(items) / wall, len(items) / cpu
                rows.append(
                    [
                        name,
                        path,
                        f"{rate:,.1f}",
                        f"{rate / base_wall:.2f}x",
                        f"{per_cpu:,.1f}",
                        f"{per_cpu / base_cpu:.2f}x",
                        f"{tokens[path] / len(items):,.0f}",
                    ]
                )
            details[name] = {"items": len(items), "requests": len(requests), "seconds": times, "tokens": tokens}
    return rows, details


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("--no-optional-locks", "status", "--porcelain", "--", "src", "benchmarks"):
        commit += " + uncommitted changes"
    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=str(SHARED_EVAL), help="benchmark data (the layout of shared/data/eval)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument(
        "--vocab",
        choices=tuple(MODEL_VOCABS),
        default="llama",
        help="embedding rows: Llama's 32,000 or the 264 byte ids",
    )
    args = parser.parse_args()
    import lm_eval
    import transformers

    device = torch.device(args.device)
    size = "small" if args.small else device.type
    vocab = MODEL_VOCABS[args.vocab]
    rows, details = run(size, device, Path(args.data), vocab)
    layers, hidden, heads, inner, context, n_mmlu, n_hs = SIZES[size]
    card = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    lines = [
        "## Evaluation: multiple-choice items/s against lm-eval's Hugging Face backend (bench_evaluate.py)",
        "",
        f"{card}, torch {torch.__version__}, lm-eval {lm_eval.__version__}, transformers {transformers.__version__}, "
        f"commit {git_commit()}. Shape ({size}): {layers} layers, hidden {hidden}, {heads} heads, inner {inner}, "
        f"vocabulary {vocab:,} rows (byte tokenizer: ids below {VOCAB}), context {context}, {'bf16' if device.type == 'cuda' else 'fp32'}, batch {BATCH}; "
        f"{n_mmlu} MMLU 5-shot items (spread over the subjects), {n_hs} HellaSwag items; best of {REPEATS} "
        "interleaved rounds. Positions: token positions run through the model per item, padding included.",
        "",
        "| task | path | items/s (wall) | vs baseline | items per CPU-second | vs baseline | positions per item |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "bench_evaluate.json").write_text(json.dumps(details, indent=1))
    if args.append:
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
