"""TrainConfig.objective: the recipe's sample mix, scaled to the sequence length, with some fields
replaced; validation keeps scoring the recipe's [gMASK] suffixes whatever the training mix."""

import re

import pytest
import torch

from glm130b.core.errors import ConfigError
from glm130b.objective.samples import ObjectiveConfig
from glm130b.train.config import TrainConfig
from glm130b.train.data_setup import build_data
from tests.data.helpers import load_stub, make_stub, prepare, random_texts, write_jsonl
from tests.train.helpers import LENGTH, tiny_run_config


def test_objective_fields_replace_the_scaled_recipes():
    config = TrainConfig(sequence_length=128, objective={"suffix_fraction_min": 0.9, "gmask_share": 0.5})
    objective = config.objective_config()
    scaled = ObjectiveConfig.for_sequence_length(128)
    assert (objective.suffix_fraction_min, objective.gmask_share) == (0.9, 0.5)
    assert objective.gmask_raw_length == scaled.gmask_raw_length == 125  # 2000/2048 of 128, not the recipe's 2000
    assert objective.mask_segment_length == 32 and objective.mask_ratio == scaled.mask_ratio


@pytest.mark.parametrize(
    "objective, message",
    [
        ({"suffix_min": 0.5}, "unknown ObjectiveConfig field(s) suffix_min"),
        ({"suffix_fraction_min": 0.0}, "suffix fractions must satisfy 0 < min <= max <= 1, got [0.0, 1.0]"),
        ({"gmask_share": 1.5}, "gmask_share must be in [0, 1]"),
        ({"sequence_length": 64}, "objective.sequence_length cannot be set"),
    ],
)
def test_bad_objective_fields_are_named(objective, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(sequence_length=128, objective=objective)


def test_validation_targets_do_not_depend_on_the_training_mix(tmp_path):
    stub = make_stub(tmp_path / "stub", mode="bytes")
    texts = write_jsonl(tmp_path / "en.jsonl", [{"text": t} for t in random_texts(400, seed=0)])
    prepare([("en", texts, "en", 1)], stub, tmp_path / "corpus")
    tokenizer = load_stub(str(stub))

    def batches(objective):
        config = tiny_run_config(
            tmp_path,
            corpus=str(tmp_path / "corpus"),
            valid_corpus=str(tmp_path / "corpus"),
            eval_batches=2,
            objective=objective,
        )
        train, valid = build_data(config, tokenizer)
        return [train.micro_batch(i) for i in range(4)], valid["en"]

    (recipe_train, recipe_valid), (long_train, long_valid) = batches({}), batches({"suffix_fraction_min": 0.9})
    for ours, theirs in zip(recipe_valid, long_valid):
        assert torch.equal(ours.targets, theirs.targets) and torch.equal(ours.loss_mask, theirs.loss_mask)
    # The training mix did change: longer [gMASK] suffixes put more of each sequence in the loss.
    scored = [sum(float(b.loss_mask.sum()) for b in run) for run in (recipe_train, long_train)]
    assert scored[1] > scored[0]
    assert all(b.input_ids.shape[1] == LENGTH for b in recipe_train + long_train)
