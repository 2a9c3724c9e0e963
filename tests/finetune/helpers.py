"""The synthetic fine-tuning task of these tests and a base model that almost knows it.

Words are 4 letters of a..h. The base model is trained (by our own full fine-tune, from a fresh
init) to copy a plain word and to shift each letter by one after a "+" ("+abch" -> "bcda"). The
task: shift a plain word, which the base answers with a copy (exact match 0 %), so a fine-tune
must turn the skill it has on for prompts without the "+": a prefix, LoRA or new weights can.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import save_model
from glm130b.finetune.config import FinetuneConfig
from glm130b.finetune.runner import run_finetune
from glm130b.model.initialization import initialize_glm
from glm130b.tokenizer.tokenizers import load_tokenizer, train_tokenizer

ALPHABET = "abcdefgh"
WORD_LENGTH = 4  # a fixed length: copying is then one attention offset, which 2 layers learn reliably
SEQUENCE_LENGTH = 48  # a record is 5 prompt tokens + [gMASK] + <sop> + 4 + <eop>: 4 records a sequence
# Training settings shared by every run of the tests (one thread, no TensorBoard, small batches).
RUN = dict(sequence_length=SEQUENCE_LENGTH, micro_batch_size=8, global_batch_size=8, log_every=1000,
           eval_every=1000, checkpoint_every=1000, tensorboard=False, device="cpu")


def shift(word: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in word)


def words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(WORD_LENGTH)) for _ in range(count)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@dataclass
class Task:
    root: Path
    base: Path    # model directory (with its tokenizer folder)
    train: Path   # 300 records of the task
    held: Path    # 100 other words
    tokenizer: object

    @classmethod
    def load(cls, root: Path) -> "Task":
        base = root / "base_run" / "model"
        return cls(root, base, root / "train.jsonl", root / "held.jsonl", load_tokenizer(base / "tokenizer"))


def build_task(root: Path) -> None:
    """Tokenizer (one id per character), data files and the trained base model under `root`."""
    torch.manual_seed(0)
    texts = [p + w for w in words(500, 0) for p in ("", "+")]
    # 259 = 256 byte pieces + 3 controls, then the 9 characters, then 8 GLM specials: no merges at all
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=259 + 9 + 8, num_threads=1)
    base_records = [r for w in words(600, 1) for r in ({"prompt": w, "target": w},
                                                        {"prompt": "+" + w, "target": shift(w)})]
    task_words = words(400, 2)
    write_jsonl(root / "base.jsonl", base_records)
    write_jsonl(root / "train.jsonl", [{"prompt": w, "target": shift(w)} for w in task_words[:300]])
    write_jsonl(root / "held.jsonl", [{"prompt": w, "target": shift(w)} for w in task_words[300:]])

    config = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=tokenizer.vocab_size,
                       inner_hidden_size=128, max_sequence_length=SEQUENCE_LENGTH, hidden_dropout=0.0,
                       attention_dropout=0.0)
    init = GLM(config)
    initialize_glm(init, seed=0)
    save_model(init, root / "init")
    tokenizer.save(root / "init" / "tokenizer")
    # 400 steps of 16 sequences at 2e-3: both skills at 100 % for every seed tried (0-4); 8 sequences
    # or 300 steps were not reliable.
    run_finetune(FinetuneConfig(
        model=str(root / "init"), data=str(root / "base.jsonl"), method="full", out_dir=str(root / "base_run"),
        train={**RUN, "micro_batch_size": 16, "global_batch_size": 16, "train_samples": 400 * 16, "lr": 2e-3,
               "warmup_fraction": 0.05, "weight_decay": 0.0, "seed": 0}), show_progress=False)
