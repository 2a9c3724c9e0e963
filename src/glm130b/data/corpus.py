"""Reading a prepared corpus: `TokenCorpus` memory-maps its shards and serves token windows and
documents per source (the corpus interface glm130b.objective.sampler draws from)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from glm130b.data.errors import DataError
from glm130b.data.manifest import CorpusTokenizer, differences, read_manifest, tokenizer_record


class TokenCorpus:
    """A prepared corpus, memory-mapped. Per source, `window` sees its documents concatenated,
    each followed by eos; `num_tokens` counts those eos tokens too. Arrays come back as int32."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest["complete"]:
            raise DataError(
                f"{self.directory} is only partly prepared; run the same `glm130b data prepare` "
                "command again to finish it"
            )
        self._shards: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._ends: dict[str, np.ndarray] = {}
        for name, state in self.manifest["sources"].items():
            shards = [self._open_shard(shard) for shard in state["shards"]]
            self._shards[name] = shards
            self._ends[name] = np.cumsum([len(tokens) for tokens, _ in shards], dtype=np.int64)

    def _open_shard(self, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        try:
            tokens = np.load(self.directory / shard["tokens_file"], mmap_mode="r")
            offsets = np.load(self.directory / shard["docs_file"], mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(
                f"{self.directory}: shard {shard['tokens_file']} cannot be read ({err}); prepare the corpus again"
            ) from None
        if len(tokens) != shard["tokens"] or len(offsets) != shard["documents"] + 1:
            raise DataError(
                f"{self.directory}: shard {shard['tokens_file']} holds {len(tokens)} tokens and "
                f"{len(offsets) - 1} documents, the manifest says {shard['tokens']} and "
                f"{shard['documents']}; the corpus is damaged, prepare it again"
            )
        return tokens, offsets

    @property
    def sources(self) -> list[str]:
        return list(self.manifest["sources"])

    @property
    def weights(self) -> dict[str, float]:
        return {name: state["weight"] for name, state in self.manifest["sources"].items()}

    @property
    def eos(self) -> int:
        return self.manifest["tokenizer"]["eos"]

    def _state(self, source: str) -> dict:
        if source not in self.manifest["sources"]:
            raise DataError(f"{self.directory} has no source {source!r}; it has {', '.join(self.sources)}")
        return self.manifest["sources"][source]

    def num_tokens(self, source: str) -> int:
        return self._state(source)["tokens"]

    def num_documents(self, source: str) -> int:
        return self._state(source)["documents"]

    def window(self, source: str, start: int, length: int) -> np.ndarray:
        """Tokens start..start+length-1 of the source's stream (documents each followed by eos)."""
        total = self.num_tokens(source)
        if start < 0 or length < 0 or start + length > total:
            raise IndexError(f"window [{start}, {start + length}) is outside source {source!r} of {total} tokens")
        ends, shards = self._ends[source], self._shards[source]
        pieces, position = [], start
        shard = int(np.searchsorted(ends, position, side="right"))
        while position < start + length:
            shard_start = int(ends[shard - 1]) if shard else 0
            take = min(start + length, int(ends[shard])) - position
            pieces.append(shards[shard][0][position - shard_start : position - shard_start + take])
            position += take
            shard += 1
        return np.concatenate(pieces).astype(np.int32) if pieces else np.empty(0, np.int32)

    def documents(self, source: str) -> Iterator[np.ndarray]:
        """Each document's tokens (without the eos that follows it in `window`), in input order."""
        self._state(source)
        for tokens, offsets in self._shards[source]:
            for begin, end in zip(offsets[:-1], offsets[1:]):
                yield np.array(tokens[begin : end - 1], dtype=np.int32)

    def check_tokenizer(self, tokenizer: CorpusTokenizer) -> None:
        """Refuse a tokenizer other than the one the corpus was prepared with."""
        expected, found = self.manifest["tokenizer"], tokenizer_record(tokenizer)
        if found != expected:
            changes = "; ".join(differences(expected, found))
            raise DataError(
                f"{self.directory} was prepared with another tokenizer ({changes}); prepare it again "
                "with this tokenizer, or use the tokenizer it was made with"
            )
