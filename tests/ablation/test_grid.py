"""The grid: switches parsed with one clear line per mistake, and the TrainConfig of every run."""

import dataclasses

import pytest
import torch

from glm130b.ablation.grid import parse_grid, provoked, samples_for_steps
from glm130b.cli.commands import main
from glm130b.core.errors import ConfigError
from glm130b.train.data_setup import build_data
from glm130b.train.optim import global_batch_size_at
from tests.ablation.helpers import tiny_base, tiny_grid
from tests.data.helpers import load_stub, make_stub, prepare, random_texts, write_jsonl


def test_grid_switches_parse_in_order():
    assert parse_grid(
        ["layernorm=deepnorm,pre,sandwich", "softmax=fp32,half", "egs=1.0,0.1", "precision=fp16,bf16"]
    ) == {
        "layernorm": ["deepnorm", "pre", "sandwich"],
        "softmax": ["fp32", "half"],
        "egs": ["1.0", "0.1"],
        "precision": ["fp16", "bf16"],
    }


@pytest.mark.parametrize(
    "items, message",
    [
        (["dropout=0,0.1"], "unknown grid switch 'dropout'; choose from layernorm, softmax, egs, precision"),
        (["layernorm"], "grid switch 'layernorm' must look like name=value,value"),
        (["layernorm=pre,"], "grid switch 'layernorm=pre,' must look like name=value,value"),
        (["layernorm=pre", "layernorm=post"], "grid switch layernorm is given twice"),
        (["egs=0.1,0.1"], "grid switch egs repeats a value"),
        (["layernorm=postln"], "layernorm=postln is not a choice; layernorm takes deepnorm, post, pre, sandwich"),
        (["egs=small"], "egs=small is not a number"),
        ([], "the grid is empty"),
    ],
)
def test_bad_grid_is_one_clear_line(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_a_value_the_config_refuses_names_the_run(tmp_path):
    with pytest.raises(
        ConfigError, match=r"grid run egs-2.0_seed-0: embedding_grad_scale must be in \(0, 1\], got 2.0"
    ):
        tiny_grid(tmp_path, {"egs": ["2.0"]})


def test_runs_differ_only_in_their_switches_and_seed(tmp_path):
    grid = tiny_grid(tmp_path, {"layernorm": ["deepnorm", "pre"], "softmax": ["fp32", "half"]}, seeds=2)
    runs = grid.runs()
    assert [r.name for r in runs[:4]] == [
        "layernorm-deepnorm_softmax-fp32_seed-0",
        "layernorm-deepnorm_softmax-half_seed-0",
        "layernorm-pre_softmax-fp32_seed-0",
        "layernorm-pre_softmax-half_seed-0",
    ]
    assert [r.seed_index for r in runs] == [0] * 4 + [1] * 4  # seed-major
    base = grid.base.to_dict()
    for run in runs:
        config = run.config.to_dict()
        assert config["model"] == {
            **base["model"],
            "layernorm_order": run.setting["layernorm"],
            "attention_softmax": run.setting["softmax"],
            "attention_backend": "reference",
        }
        assert config["seed"] == base["seed"] + run.seed_index
        assert config["data_seed"] == base["seed"]  # one data order for every run
        assert config["out_dir"] == str(tmp_path / "grid" / "runs" / run.name)
        same = {k for k in base if k not in ("model", "seed", "data_seed", "out_dir", "resume")}
        assert {k: config[k] for k in same} == {k: base[k] for k in same}


def trainer_steps(config, total):
    """Updates the trainer makes to reach `total` samples (its step loop, batch ramp-up included)."""
    run = dataclasses.replace(config, train_samples=total)
    steps = done = 0
    while done < total:
        done += global_batch_size_at(done, run)
        steps += 1
    return steps


def test_data_seed_defaults_to_seed_and_is_checked(tmp_path):
    assert tiny_base(tmp_path, seed=5).sampler_seed == 5
    assert tiny_base(tmp_path, seed=5, data_seed=9).sampler_seed == 9
    with pytest.raises(ConfigError, match="data_seed must be an integer >= 0 or null, got -1"):
        tiny_base(tmp_path, data_seed=-1)


def test_provocation_scales_the_lr_schedule_and_the_warmup(tmp_path):
    base = tiny_base(tmp_path, lr=2e-3, min_lr=2e-4, warmup_fraction=0.2)
    hot = provoked(base, 30, lr_multiplier=4.0, warmup_multiplier=0.25)
    assert (hot.lr, hot.min_lr, hot.warmup_fraction) == (8e-3, 8e-4, 0.05)
    with pytest.raises(ConfigError, match="lr multiplier must be a positive number, got 0"):
        provoked(base, 30, lr_multiplier=0)


@pytest.mark.parametrize("rampup", [4, None])
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_steps_are_updates_with_the_fewest_samples(tmp_path, steps, rampup):
    config = tiny_base(tmp_path, rampup_start_batch_size=rampup)
    total = samples_for_steps(config, steps)
    assert trainer_steps(config, total) == steps
    assert total == 1 or trainer_steps(config, total - 1) < steps


def test_cli_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    path = tmp_path / "base.yaml"
    tiny_base(tmp_path).save(path)
    assert main(["ablate", "--config", str(path), "--grid", "layernorm=peri", "--steps", "5"]) == 2
    assert capsys.readouterr().err == (
        "glm130b: layernorm=peri is not a choice; layernorm takes deepnorm, post, pre, sandwich\n"
    )


def test_data_seed_fixes_the_batches_whatever_the_seed(tmp_path):
    """build_data draws training and validation batches from data_seed when it is set, from seed otherwise."""
    stub = make_stub(tmp_path / "stub", mode="bytes")
    texts = write_jsonl(tmp_path / "en.jsonl", [{"text": t} for t in random_texts(400, seed=0)])
    prepare([("en", texts, "en", 1)], stub, tmp_path / "corpus")
    tokenizer = load_stub(str(stub))

    def batches(**seeds):
        config = tiny_base(
            tmp_path, corpus=str(tmp_path / "corpus"), valid_corpus=str(tmp_path / "corpus"), eval_batches=1, **seeds
        )
        train, valid = build_data(config, tokenizer)
        return train.micro_batch(3).input_ids, valid["en"][0].input_ids

    for fixed, other in zip(batches(seed=1, data_seed=7), batches(seed=2, data_seed=7)):
        assert torch.equal(fixed, other)
    for own, other in zip(batches(seed=1), batches(seed=2)):
        assert not torch.equal(own, other)
