"""Shared helpers of the evaluation tests: the character tokenizer, tiny GLMs, task files written
by the test."""

import json
import random

import torch

from glm130b import GLM, GLMConfig
from glm130b.tokenizer.specials import SpecialTokens
from tests.evaluate.char_tokenizer import ALPHABET, SPECIAL_IDS, VOCAB_SIZE, CharTokenizerBase

TOK = SpecialTokens(**SPECIAL_IDS)


class CharTokenizer(CharTokenizerBase):
    specials = TOK


def tiny_glm(seed: int = 0, vocab: int = VOCAB_SIZE, max_len: int = 256) -> GLM:
    torch.manual_seed(seed)
    config = GLMConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=vocab,
        inner_hidden_size=64,
        max_sequence_length=max_len,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GLM(config).eval()
    # A milder embedding than N(0, 1): the random model's choices then vary instead of always picking one.
    torch.nn.init.normal_(model.transformer.word_embeddings.weight, std=0.3)
    return model


def random_words(rng: random.Random, n: int) -> str:
    letters = ALPHABET[1:27]
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 6))) for _ in range(n))


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def mul_records(seed: int, n: int, choices: int = 4, single_token: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        options = (
            [rng.choice(ALPHABET[1:27]) for _ in range(choices)]
            if single_token
            else [random_words(rng, rng.randint(1, 3)) for _ in range(choices)]
        )
        out.append(
            {
                "inputs_pretokenized": random_words(rng, rng.randint(3, 12)) + ".",
                "choices_pretokenized": options,
                "label": rng.randrange(choices),
            }
        )
    return out


def gen_records(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "inputs_pretokenized": random_words(rng, rng.randint(3, 10)),
            "targets_pretokenized": [random_words(rng, 1), random_words(rng, 2)],
        }
        for _ in range(n)
    ]


class ByteTokenizer:
    """UTF-8 bytes as ids 8..263 (any text, Chinese included), the specials at 0..6; it can prepare
    a corpus too (glm130b.data.prepare: `load_byte_tokenizer` is its loader)."""

    specials = TOK
    vocab_size = 8 + 256

    def encode(self, text: str) -> list[int]:
        return [8 + b for b in text.encode("utf-8")]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def fingerprint(self) -> str:
        return "byte-tokenizer-for-tests"

    def decode(self, ids) -> str:
        return bytes(i - 8 for i in ids if i >= 8).decode("utf-8", errors="replace")


def load_byte_tokenizer(directory) -> ByteTokenizer:
    return ByteTokenizer()
