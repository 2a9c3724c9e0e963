"""Shared helpers of the data tests: a stub tokenizer with obvious ids, corpus input writers, and
the reference a read-back is compared with (the tokenizer applied to the documents directly).

StubTokenizer has the project's tokenizer interface; worker processes rebuild it from its folder
with `load_stub`, which is why it lives in an importable module.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np

from glm130b.data.prepare import prepare_corpus
from glm130b.tokenizer.specials import SpecialTokens

REPO = Path(__file__).resolve().parents[2]
STUB_EOS = 1
STUB_OFFSET = 3  # ids 0..2 are pad, eos and a spare, as in a real vocabulary


class StubTokenizer:
    """One id per character (vocab > 2**16: uint32 shards) or per UTF-8 byte (uint16 shards).
    `poison` makes encoding a text that contains it fail; `delay` slows each batch down."""

    def __init__(self, directory: str):
        config = json.loads((Path(directory) / "stub.json").read_text())
        self.mode, self.poison, self.delay = config["mode"], config.get("poison"), config.get("delay", 0)
        self.vocab_size = STUB_OFFSET + (0x110000 if self.mode == "chars" else 256)
        self.specials = SpecialTokens(eos=STUB_EOS)

    def encode(self, text: str) -> list[int]:
        if self.poison and self.poison in text:
            raise RuntimeError("injected failure")
        codes = [ord(c) for c in text] if self.mode == "chars" else list(text.encode())
        return [STUB_OFFSET + c for c in codes]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        time.sleep(self.delay)
        return [self.encode(t) for t in texts]

    def fingerprint(self) -> str:
        return hashlib.sha256(f"stub-{self.mode}".encode()).hexdigest()


def load_stub(directory: str) -> StubTokenizer:
    return StubTokenizer(directory)


def make_stub(directory: Path, mode: str = "chars", **options) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stub.json").write_text(json.dumps({"mode": mode, **options}))
    return directory


def reference_stream(tokenizer, texts: list[str]) -> np.ndarray:
    return np.array([t for text in texts for t in tokenizer.encode(text) + [STUB_EOS]], dtype=np.int64)


def random_texts(count: int, seed: int, lang: str = "en") -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop,.\n" if lang == "en" else "的一是不了人我在有他这中大来上国个到说们为"
    return [
        f"{lang} doc {i}: " + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for i in range(count)
    ]


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    lines = b"".join(
        r if isinstance(r, bytes) else (json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records
    )
    path.write_bytes(gzip.compress(lines) if compress else lines)
    return path


def prepare(sources, stub_dir, out, **options):
    return prepare_corpus(sources, stub_dir, out, loader=load_stub, **{"workers": 1, **options})
