"""A tiny trained model directory and a real server for the serving tests.

The model is tests/generate/test_decode.py's reverser, on a real (SentencePiece, character-level)
tokenizer saved beside it, so `glm130b serve --model DIR` loads it like any model directory:
after [gMASK] it reverses three letters ("abc" -> "cba"); in a [MASK] blank it completes an
alphabet run up to the letter after the blank ("ab[MASK]f" -> "cde"), then ends the span.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch
import uvicorn

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import save_model
from glm130b.tokenizer.tokenizers import train_tokenizer
from tests.generate.helpers import fit_spans
from tests.helpers import free_port

LETTERS = "abcdefgh"
# SentencePiece needs 256 byte pieces and 3 control pieces; one piece per letter on top leaves no
# room for merges, so the tokenizer is character-level and letter ids are predictable.
NUM_PIECES = 256 + 3 + len(LETTERS)
SPECIALS = 8
MAX_SEQUENCE = 512  # long enough that a 400-token request is still running when a test cancels or stops it


def write_tokenizer(directory: Path):
    rng = random.Random(0)
    texts = ["".join(rng.choice(LETTERS) for _ in range(20)) for _ in range(200)]
    return train_tokenizer(texts, directory, vocab_size=NUM_PIECES + SPECIALS, num_threads=1)


def task(rng, letter_ids, tok):
    """[gMASK] after three letters -> them reversed; [MASK] inside an alphabet run -> the missing run."""
    if rng.random() < 0.5:
        s = [rng.choice(letter_ids) for _ in range(3)]
        return s + [tok.gmask], s[::-1]
    gap = rng.randint(1, 3)
    start = rng.randrange(0, len(LETTERS) - 2 - gap)
    run = letter_ids[start : start + 3 + gap]
    return [run[0], run[1], tok.mask, run[-1], tok.eos], run[2:-1]


def train_model(tokenizer, steps: int = 300, seed: int = 0) -> GLM:
    torch.manual_seed(seed)
    cfg = GLMConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=tokenizer.vocab_size,
        inner_hidden_size=128,
        max_sequence_length=MAX_SEQUENCE,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GLM(cfg)
    torch.nn.init.normal_(model.transformer.word_embeddings.weight, std=0.02)
    tok = tokenizer.specials
    letter_ids = [tokenizer.encode(c)[0] for c in LETTERS]
    return fit_spans(model, lambda rng: task(rng, letter_ids, tok), tok, steps, seed)


def write_model_dir(directory: Path) -> Path:
    """config.json + model.safetensors + tokenizer/, as `glm130b serve --model` reads them."""
    tokenizer = write_tokenizer(directory / "tokenizer")
    save_model(train_model(tokenizer), directory)
    return directory


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread of this process."""

    def __init__(self, app, startup_timeout: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start on {self.url} within {startup_timeout} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
