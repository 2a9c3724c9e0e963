"""Command-line entry points of this package: `glm130b tokenizer train` and `glm130b tokenizer encode`."""

from __future__ import annotations

import argparse
from pathlib import Path

from glm130b.core.atomic import check_output_folder
from glm130b.tokenizer.specials import SPECIAL_NAMES
from glm130b.tokenizer.tokenizers import load_tokenizer, train_tokenizer
from glm130b.tokenizer.training import DEFAULT_CHARACTER_COVERAGE, DEFAULT_INPUT_SENTENCE_SIZE


def cmd_train(args: argparse.Namespace) -> int:
    check_output_folder(args.out)  # before the training, not after it
    tokenizer = train_tokenizer(
        [Path(p) for p in args.corpus],
        args.out,
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.threads,
        seed=args.seed,
    )
    print(
        f"saved to {args.out}: {tokenizer.vocab_size} ids ({tokenizer.num_pieces} pieces + "
        f"{len(SPECIAL_NAMES)} specials), fingerprint {tokenizer.fingerprint()[:16]}"
    )
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode_prompt(args.text) if args.prompt else tokenizer.encode(args.text)
    print(" ".join(map(str, ids)))
    return 0


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("corpus", nargs="+", help='.jsonl(.gz) files with a "text" field, or plain text files')
    train.add_argument("--out", required=True, help="folder to save the tokenizer in")
    train.add_argument(
        "--vocab-size",
        type=int,
        default=16384,
        help="ids in all, specials included (the model's vocab must be at least this)",
    )
    train.add_argument(
        "--character-coverage",
        type=float,
        default=DEFAULT_CHARACTER_COVERAGE,
        help="share of characters with a piece of their own; the rest is spelled in bytes",
    )
    train.add_argument(
        "--input-sentence-size",
        type=int,
        default=DEFAULT_INPUT_SENTENCE_SIZE,
        help="lines picked at random to train on",
    )
    train.add_argument("--threads", type=int, default=None, help="training threads (default: all cores)")
    train.add_argument("--seed", type=int, default=0, help="seeds sentencepiece's sampling of the corpus")


def add_encode_arguments(encode: argparse.ArgumentParser) -> None:
    encode.add_argument("tokenizer", help="a saved tokenizer folder, or icetk's ice_text.model (or its folder)")
    encode.add_argument("text", help="the text to encode (quote it)")
    encode.add_argument(
        "--prompt", action="store_true", help="turn [MASK]/[sMASK]/[gMASK] written in the text into mask tokens"
    )
