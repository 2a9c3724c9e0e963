"""Training our own bilingual tokenizer (`glm130b tokenizer train`): a SentencePiece unigram model
like icetk's, with settings that make every UTF-8 string round-trip exactly: byte fallback,
identity normalisation, no whitespace collapsing, no dummy prefix (ids of two strings concatenated
decode to the strings concatenated), split digits, pad 0 / unk 1 / eos 2 and no bos. The reasons
for each: docs/tokenizer.md, "BilingualTokenizer". The eight GLM specials are appended after the
pieces by glm130b.tokenizer.tokenizers.BilingualTokenizer.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from glm130b.core.errors import GLMError


class TokenizerTrainingError(GLMError):
    """A corpus that cannot be read, or settings SentencePiece cannot train with."""


# SentencePiece drops training sentences over 4192 bytes (its max_sentence_length); lines are cut
# into chunks of 1000 characters, at most 4000 UTF-8 bytes.
CHUNK_CHARS = 1000
# Lines SentencePiece picks at random to train on: 50k of the ~430k lines of the ~30 MB demo corpus train a
# 16k vocabulary in ~30 s of CPU (1-2 min wall on the shared 2 cores); 100k took about 3 times as
# long for the same characters per token on held-out text (English 3.53, Chinese 1.33).
DEFAULT_INPUT_SENTENCE_SIZE = 50_000
# Share of characters that get their own piece; the rarest rest is spelled in bytes. SentencePiece
# accepts 0.98..1; 0.9995 is its usual setting for Chinese/Japanese.
DEFAULT_CHARACTER_COVERAGE = 0.9995


def read_documents(source: str | os.PathLike) -> Iterator[str]:
    """The texts of a file: the "text" field of each line of .jsonl(.gz), or the whole file otherwise."""
    path = Path(source)
    if not path.is_file():
        raise TokenizerTrainingError(
            f'corpus file {path} does not exist; pass .jsonl(.gz) files with a "text" field or plain text files'
        )
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise TokenizerTrainingError(
                                f'{path} line {n}: not a JSON object with a "text" field'
                            ) from None
            else:
                yield f.read()
    except UnicodeDecodeError as err:
        raise TokenizerTrainingError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None


def training_sentences(texts_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Non-empty lines of every document, cut to CHUNK_CHARS. A `str` item is a text, a path object
    (pathlib.Path) a corpus file."""
    documents = (
        doc for item in texts_or_files for doc in (read_documents(item) if isinstance(item, os.PathLike) else (item,))
    )
    count = 0
    for doc in tqdm(documents, desc="reading corpus", unit=" docs"):
        for line in doc.split("\n"):
            for start in range(0, len(line), CHUNK_CHARS):
                count += 1
                yield line[start : start + CHUNK_CHARS]
    tqdm.write(f"{count} lines read; SentencePiece trains on a random subset of them (1-2 minutes for 30 MB)")


def train_sentencepiece(
    texts_or_files: Iterable[str | os.PathLike],
    num_pieces: int,
    *,
    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
    input_sentence_size: int = DEFAULT_INPUT_SENTENCE_SIZE,
    num_threads: int | None = None,
    seed: int = 0,
) -> bytes:
    """The serialized SentencePiece model (`num_pieces` pieces) trained on the texts or files."""
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the lines it picks and the trainer's own randomness
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(texts_or_files),
            model_writer=model,
            model_type="unigram",
            vocab_size=num_pieces,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            pad_id=0,
            unk_id=1,
            eos_id=2,
            bos_id=-1,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise TokenizerTrainingError(
            f"SentencePiece training failed: {err}. The {num_pieces} pieces must hold 256 bytes, 3 control "
            f"pieces and every character kept by character_coverage={character_coverage}: raise the vocabulary "
            "size, lower character_coverage (>= 0.98), or give more text"
        ) from None
    return model.getvalue()
