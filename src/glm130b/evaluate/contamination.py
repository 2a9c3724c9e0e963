"""Contamination: which evaluated items share an n-gram with a prepared training corpus, and the
score on the clean items next to the full score (GPT-3's procedure, Brown et al. 2020, C.1).

Text is normalised as GPT-3 did: lowercased, punctuation dropped, split into words (each CJK
character a word of its own, as Chinese has no spaces). An item's n-grams come from its input,
choices and references; an item shorter than n words is one gram of all its words. The corpus is
streamed document by document (decoded with the tokenizer it was prepared with), so memory holds
only the tasks' n-grams. lm tasks are checked per scored window.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from glm130b.data.corpus import TokenCorpus
from glm130b.evaluate.config import TaskConfig
from glm130b.evaluate.items import read_task_file
from glm130b.evaluate.language_model import windows
from glm130b.evaluate.runner import summarize
from glm130b.evaluate.scores import UnitScores

DEFAULT_NGRAM = 13  # GPT-3's n
WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")  # a CJK character, or a run of letters/digits


def normalized_words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def item_grams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalized_words(text)
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class OverlapIndex:
    """The n-grams of every unit (task, file, unit index); `scan` marks the units a text overlaps."""

    def __init__(self, n: int):
        self.n = n
        self.owners: dict[tuple[str, ...], list[tuple]] = defaultdict(list)
        self.lengths: set[int] = set()
        self.hits: set[tuple] = set()

    def add(self, unit: tuple, text: str) -> None:
        for gram in item_grams(text, self.n):
            self.owners[gram].append(unit)
            self.lengths.add(len(gram))

    def scan(self, text: str) -> None:
        words = normalized_words(text)
        for k in self.lengths:
            for i in range(len(words) - k + 1):
                owners = self.owners.get(tuple(words[i : i + k]))
                if owners:
                    self.hits.update(owners)


def unit_texts(config: TaskConfig, data_root: str | Path, result: dict, tokenizer) -> dict[tuple, str]:
    """The text of every scored unit of a task result, keyed (task, file, unit position)."""
    base = Path(data_root) / config.path
    texts = {}
    for name, entry in result["files"].items():
        task_file = read_task_file(base / name, config.type, tokenizer, None, config.protocol)
        if config.protocol == "pile":
            windows_of = [
                (item, seq)
                for item in task_file.items
                for seq in windows(item.context, result["context_length"], config.generation_length, tokenizer.specials)
            ]
            for u, (_, seq) in enumerate(windows_of[: entry["units"]]):
                texts[(config.name, name, u)] = tokenizer.decode(seq.spans[0][1])
            continue
        if config.type == "lm":
            seqs = windows(
                task_file.tokens,
                result["context_length"],
                config.generation_length,
                tokenizer.specials,
                max_windows=entry["units"],
            )
            for u, seq in enumerate(seqs):
                texts[(config.name, name, u)] = tokenizer.decode(seq.spans[0][1])
            continue
        items = {item.index: item for item in task_file.items}
        for u, record in enumerate(entry["records"]):
            indices = record["indices"] if "indices" in record else [record["index"]]  # CrowS-Pairs: a pair
            parts = []
            for item in (items[i] for i in indices):
                parts += [item.text, *(item.choice_texts or [tokenizer.decode(t) for t in item.targets])]
            texts[(config.name, name, u)] = "\n".join(parts)
    return texts


def contamination_reports(
    configs: list[TaskConfig],
    results: list[dict],
    data_root: str | Path,
    corpus_dir: str | Path,
    tokenizer,
    n: int = DEFAULT_NGRAM,
) -> list[dict]:
    """One report per task: contaminated units, their fraction, and each metric on the clean units."""
    index = OverlapIndex(n)
    for config, result in zip(configs, results):
        for unit, text in unit_texts(config, data_root, result, tokenizer).items():
            index.add(unit, text)
    corpus = TokenCorpus(corpus_dir)
    corpus.check_tokenizer(tokenizer)
    total = sum(corpus.num_documents(s) for s in corpus.sources)
    with tqdm(total=total, desc="decontaminate", unit="doc", dynamic_ncols=True, leave=False) as bar:
        for source in corpus.sources:
            for document in corpus.documents(source):
                index.scan(tokenizer.decode(document.tolist()))
                bar.update()
    reports = []
    for config, result in zip(configs, results):
        flagged = {
            name: [u for u in range(entry["units"]) if (config.name, name, u) in index.hits]
            for name, entry in result["files"].items()
        }
        units = sum(entry["units"] for entry in result["files"].values())
        dirty = sum(map(len, flagged.values()))
        clean = []
        for name, entry in result["files"].items():
            dropped = set(flagged[name])
            keep = [u for u in range(entry["units"]) if u not in dropped]
            if keep:
                clean.append(
                    {
                        m: UnitScores(s["kind"], [s["num"][u] for u in keep], [s["den"][u] for u in keep])
                        for m, s in entry["scores"].items()
                    }
                )
        reports.append(
            {
                "ngram": n,
                "corpus": str(Path(corpus_dir).resolve()),
                "units": units,
                "contaminated": dirty,
                "fraction": dirty / units,
                "full": result["metrics"],
                "clean": summarize(clean, list(result["metrics"])) if clean else None,
                "contaminated_units": {k: v for k, v in flagged.items() if v},
            }
        )
    return reports
