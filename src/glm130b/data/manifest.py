"""The manifest of a prepared corpus (manifest.json): its format, reading and writing it, the
tokenizer record it keeps, and the token dtype it names. Fields: docs/data.md, "What is written"."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from glm130b.core.config_io import read_mapping, write_mapping
from glm130b.core.errors import ConfigError
from glm130b.data.errors import DataError
from glm130b.tokenizer.specials import SpecialTokens

MANIFEST_FILE = "manifest.json"
FORMAT = "glm130b-token-corpus"
FORMAT_VERSION = 1
UINT16_VOCAB = 2**16  # ids 0..65535 fit uint16 shards, half the size of uint32


class CorpusTokenizer(Protocol):
    """What preparing a corpus needs of a tokenizer (glm130b.tokenizer.tokenizers.Tokenizer has it)."""

    specials: SpecialTokens
    vocab_size: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def fingerprint(self) -> str: ...


def tokenizer_record(tokenizer: CorpusTokenizer) -> dict:
    """What the manifest records of the tokenizer: equal records give equal tokens."""
    return {
        "fingerprint": tokenizer.fingerprint(),
        "vocab_size": int(tokenizer.vocab_size),
        "eos": int(tokenizer.specials.eos),
    }


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB else np.uint32)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{directory} is not a prepared corpus ({MANIFEST_FILE} is missing); make one with `glm130b data prepare`"
        )
    try:
        manifest = read_mapping(path, "corpus manifest")
    except ConfigError as err:
        raise DataError(f"{path} is not a readable manifest ({err}); prepare the corpus again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSION}; prepare the corpus again")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    write_mapping(directory / MANIFEST_FILE, manifest)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key.subkey: old -> new` for every leaf where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new), key=str)
            for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
