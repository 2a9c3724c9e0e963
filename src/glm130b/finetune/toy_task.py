"""A synthetic fine-tuning task with a base model that almost knows it, small enough for a CPU.

The task: shift every letter of a 4-letter word over a..h by one ("abch" -> "bcda"). The base is
trained, by a full fine-tune from a fresh init, to copy a plain word and to shift one written after
a "+"; asked the task (a plain word) it answers with a copy, exact match 0 %, until a fine-tune
turns the skill on for plain prompts: a prefix, LoRA or new weights can. The tests of
glm130b.finetune and benchmarks/bench_finetune.py measure every method on it; building it takes
about 20 s on one CPU thread.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm130b.checkpoint.model_dir import save_model
from glm130b.finetune.config import TOKENIZER_DIR, FinetuneConfig
from glm130b.finetune.runner import MODEL_DIR, run_finetune
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.model.initialization import initialize_glm
from glm130b.tokenizer.tokenizers import Tokenizer, load_tokenizer, train_tokenizer

ALPHABET = "abcdefgh"
WORD_LENGTH = 4  # a fixed length: copying is one attention offset, which 2 layers learn reliably
SEQUENCE_LENGTH = 48  # a record is 5 prompt tokens + [gMASK] + <sop> + 4 + <eop>: 4 records a sequence
TRAIN_WORDS, HELD_OUT_WORDS = 300, 100
# Settings of every run on the task: small batches, one device, no TensorBoard, rare checkpoints.
RUN: dict[str, Any] = dict(
    sequence_length=SEQUENCE_LENGTH,
    micro_batch_size=8,
    global_batch_size=8,
    log_every=1000,
    eval_every=1000,
    checkpoint_every=1000,
    tensorboard=False,
)
# The base: 400 steps of 16 sequences at 2e-3 learnt both skills to 100 % for every seed tried (0-4);
# 8 sequences a step, or 300 steps, did not always.
BASE_RUN: dict[str, Any] = {
    **RUN,
    "micro_batch_size": 16,
    "global_batch_size": 16,
    "train_samples": 400 * 16,
    "lr": 2e-3,
    "warmup_fraction": 0.05,
    "weight_decay": 0.0,
    "seed": 0,
    "precision": "fp32",
}

# FinetuneConfig fields and training settings that take each method from 0 to >= 90 % exact match
# on the held-out words (each reached 100 % in the runs made while writing this). Rates suit the
# 2-layer base: far above what a large model takes (glm130b.finetune.config.METHOD_DEFAULTS).
METHOD_RUNS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "full": ({"method": "full"}, {"lr": 1e-3, "train_samples": 100 * 8}),
    "lora": ({"method": "lora"}, {"lr": 1e-2, "train_samples": 100 * 8}),
    "ptuning": ({"method": "ptuning", "prefix_length": 8}, {"lr": 5e-2, "train_samples": 200 * 8}),
    "lora-int8": ({"method": "lora", "quantized": "int8"}, {"lr": 1e-2, "train_samples": 100 * 8}),
    "lora-int4": ({"method": "lora", "quantized": "int4"}, {"lr": 1e-2, "train_samples": 100 * 8}),
}


def shift(word: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in word)


def words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(WORD_LENGTH)) for _ in range(count)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@dataclass
class ToyTask:
    root: Path
    base: Path  # the base model directory, its tokenizer folder inside
    train: Path  # TRAIN_WORDS records of the task
    held: Path  # HELD_OUT_WORDS other words
    tokenizer: Tokenizer

    @classmethod
    def load(cls, root: str | Path) -> ToyTask:
        root = Path(root)
        base = root / "base_run" / MODEL_DIR
        return cls(root, base, root / "train.jsonl", root / "held.jsonl", load_tokenizer(base / TOKENIZER_DIR))


def build_toy_task(root: str | Path, device: str = "cpu") -> ToyTask:
    """Tokenizer (one id per character), the data files and the trained base model under `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    texts = [p + w for w in words(500, 0) for p in ("", "+")]
    # 259 = 256 byte pieces + 3 controls, then the 9 characters, then 8 GLM specials: no merges at all
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=259 + len(ALPHABET) + 1 + 8, num_threads=1)
    base = [r for w in words(600, 1) for r in ({"prompt": w, "target": w}, {"prompt": "+" + w, "target": shift(w)})]
    task = words(TRAIN_WORDS + HELD_OUT_WORDS, 2)
    write_jsonl(root / "base.jsonl", base)
    write_jsonl(root / "train.jsonl", [{"prompt": w, "target": shift(w)} for w in task[:TRAIN_WORDS]])
    write_jsonl(root / "held.jsonl", [{"prompt": w, "target": shift(w)} for w in task[TRAIN_WORDS:]])
    config = GLMConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=tokenizer.vocab_size,
        inner_hidden_size=128,
        max_sequence_length=SEQUENCE_LENGTH,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    init = GLM(config)
    initialize_glm(init, seed=0)
    save_model(init, root / "init")
    tokenizer.save(root / "init" / TOKENIZER_DIR)
    run_finetune(
        FinetuneConfig(
            model=str(root / "init"),
            data=str(root / "base.jsonl"),
            method="full",
            out_dir=str(root / "base_run"),
            train={**BASE_RUN, "device": device},
        ),
        show_progress=False,
    )
    return ToyTask.load(root)
