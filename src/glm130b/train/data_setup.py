"""The data of a pretraining run from its config: the training sampler over the prepared corpus
and fixed validation batches per language of the validation corpus."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from glm130b.data.corpus import TokenCorpus
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.sampler import GLMBatchSampler
from glm130b.objective.samples import ObjectiveConfig, load_mip_pairs
from glm130b.train.config import TrainConfig


class BatchSource(Protocol):
    """Micro-batches by index, deterministic in (seed, index), each of micro_batch_size sequences."""

    def micro_batch(self, index: int) -> TrainingBatch: ...


class CorpusSubset:
    """Some sources of a corpus with their weights renormalised: the corpus interface that
    GLMBatchSampler reads, e.g. one language of a bilingual validation corpus."""

    def __init__(self, corpus, sources: list[str]):
        self.corpus, self.sources = corpus, list(sources)
        total = sum(corpus.weights[s] for s in self.sources)
        self.weights = {s: corpus.weights[s] / total for s in self.sources}

    def num_tokens(self, source: str) -> int:
        return self.corpus.num_tokens(source)

    def window(self, source: str, start: int, length: int):
        return self.corpus.window(source, start, length)


def sources_by_language(corpus) -> dict[str, list[str]]:
    languages: dict[str, list[str]] = {}
    for name, state in corpus.manifest["sources"].items():
        languages.setdefault(state["lang"], []).append(name)
    return languages


def validation_objective(objective: ObjectiveConfig) -> ObjectiveConfig:
    """Validation scores [gMASK] samples only: the loss of a left-to-right suffix given its
    prefix, comparable across languages and with a unigram model of the same tokens. The suffix
    lengths are the recipe's whatever the training mix draws, so that runs with different mixes
    are scored on the same targets."""
    recipe = ObjectiveConfig()
    return dataclasses.replace(
        objective,
        gmask_share=1.0,
        mip_share=0.0,
        suffix_fraction_min=recipe.suffix_fraction_min,
        suffix_fraction_max=recipe.suffix_fraction_max,
    )


def build_data(config: TrainConfig, tokenizer) -> tuple[BatchSource, dict[str, list[TrainingBatch]]]:
    """The training sampler over `config.corpus` and fixed validation batches per language of
    `config.valid_corpus` (glm130b.data, glm130b.objective.sampler)."""
    objective = config.objective_config()
    mip_pairs = load_mip_pairs(config.mip_data, tokenizer) if config.mip_data else None
    if mip_pairs is None:  # no instruction data: the self-supervised mix only
        objective = dataclasses.replace(objective, mip_share=0.0)
    position_encoding = config.model_config().position_encoding
    corpus = TokenCorpus(config.corpus)
    corpus.check_tokenizer(tokenizer)
    train = GLMBatchSampler(
        corpus,
        objective,
        tokenizer.specials,
        config.micro_batch_size,
        config.sampler_seed,
        mip_pairs=mip_pairs,
        position_encoding=position_encoding,
    )
    valid: dict[str, list[TrainingBatch]] = {}
    if config.valid_corpus:
        held_out = TokenCorpus(config.valid_corpus)
        held_out.check_tokenizer(tokenizer)
        for language, names in sources_by_language(held_out).items():
            sampler = GLMBatchSampler(
                CorpusSubset(held_out, names),
                validation_objective(objective),
                tokenizer.specials,
                config.micro_batch_size,
                config.sampler_seed,
                position_encoding=position_encoding,
            )
            valid[language] = sampler.validation_batches(config.eval_batches)
    return train, valid
