"""Command-line entry points of this package: `glm130b data prepare | info | demo`."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from glm130b.core.atomic import check_output_folder
from glm130b.core.errors import GLMError
from glm130b.data.corpus import TokenCorpus
from glm130b.data.demo_corpus import DEFAULT_CACHE, RECORD_FILE, fetch_demo_corpus, prepare_demo_corpus
from glm130b.data.errors import DataError
from glm130b.data.prepare import DEFAULT_SHARD_TOKENS, prepare_corpus
from glm130b.data.sources import parse_source_spec


def cmd_prepare(args: argparse.Namespace) -> int:
    specs = [parse_source_spec(s) for s in args.source]
    out = check_output_folder(args.out)
    existed = out.exists()
    started = time.monotonic()
    try:
        manifest = prepare_corpus(
            specs, args.tokenizer, out, workers=args.workers, shard_tokens=args.shard_tokens, overwrite=args.overwrite
        )
    except GLMError:
        # a first run that failed before writing any shard leaves nothing behind (a rerun resumes
        # from the shards of one that got further)
        if not existed and not any(out.rglob("*.tokens.npy")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(describe_manifest(manifest))
    print(f"prepared {args.out} in {time.monotonic() - started:.1f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(describe_manifest(TokenCorpus(args.corpus).manifest))
    return 0


def describe_manifest(manifest: dict) -> str:
    lines = [
        f"tokenizer {manifest['tokenizer']['fingerprint']}, vocab {manifest['tokenizer']['vocab_size']}, "
        f"tokens stored as {manifest['dtype']}"
    ]
    for name, s in manifest["sources"].items():
        skipped = sum(s["skipped"].values())
        lines.append(
            f"  {name:<20} {s['lang']:<4} weight {s['weight']:.3f}  {s['documents']:>9,} documents  "
            f"{s['tokens']:>12,} tokens  {len(s['shards'])} shards"
            + (f"  skipped {skipped}: {s['skipped']}" if skipped else "")
        )
    for lang, t in manifest.get("languages", {}).items():
        lines.append(f"  language {lang:<11} {t['documents']:>20,} documents  {t['tokens']:>12,} tokens")
    return "\n".join(lines)


def add_prepare_arguments(prepare: argparse.ArgumentParser) -> None:
    prepare.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="SPEC",
        help="name=NAME,lang=LANG,path=PATH[,weight=W][,text_field=text][,where=FIELD:VALUE]; repeat for each source",
    )
    prepare.add_argument("--tokenizer", required=True, help="tokenizer directory")
    prepare.add_argument("--out", required=True, help="output corpus directory")
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    prepare.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a corpus in --out that was prepared from other sources or tokenizer",
    )


def add_info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("corpus", help="prepared corpus directory")


def cmd_demo(args: argparse.Namespace) -> int:
    if args.tokenizer is None:  # fetch only: the texts, e.g. to train a tokenizer on them first
        corpus = fetch_demo_corpus(args.cache)
        for split, specs in (("train", corpus.train), ("valid", corpus.valid)):
            print(f"{split}: {' '.join(str(s.path) for s in specs)}")
    else:
        if args.out is None:
            raise DataError("give --out, the folder to prepare train/ and valid/ in")
        for directory in prepare_demo_corpus(args.tokenizer, args.out, args.cache, workers=args.workers):
            print(f"{directory}:\n{describe_manifest(TokenCorpus(directory).manifest)}")
    print(f"licenses: {Path(args.cache) / RECORD_FILE}")
    return 0


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--tokenizer", help="tokenizer directory; without it the corpus is only fetched and its JSON lines files listed"
    )
    demo.add_argument("--out", help="output folder; gets train/ and valid/ corpora")
    demo.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the downloads and texts are kept")
    demo.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
