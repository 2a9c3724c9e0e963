"""The trainer: exact resume, atomic and pruned checkpoints, loss scaling in a real step, MFU
arithmetic, configuration errors and command-line overrides."""

import argparse
import math
import re

import pytest
import torch
import yaml

from glm130b import GLM, GLMConfig, cli
from glm130b.checkpoint.model_dir import load_model
from glm130b.core.errors import ConfigError, GLMError
from glm130b.model.flops import training_flops
from glm130b.train.config import TrainConfig, add_config_arguments, apply_overrides, overrides_from_args
from glm130b.train.metrics import MetricsLog, batch_work, read_metrics, throughput
from glm130b.train.run_checkpoint import latest_checkpoint, list_checkpoints
from tests.train.helpers import LENGTH, CountingSource, last_loss_per_step, make_trainer, tiny_run_config


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(tmp_path):
    straight = tiny_run_config(tmp_path, "straight")
    make_trainer(straight).train()
    reference = last_loss_per_step(straight.out_dir)
    assert len(reference) > 16  # ramp-up: the first steps take 4 sequences, later ones 8

    killed = tiny_run_config(tmp_path, "killed")
    with pytest.raises(KeyboardInterrupt):
        # ramp-up: steps 1-8 take micro-batch 0..7, then two a step; it dies inside step 12
        make_trainer(killed, CountingSource(stop_at=15)).train()
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_00000010"
    resumed = make_trainer(killed)  # fresh process state: new model, new optimizer, reseeded RNG
    torch.manual_seed(12345)  # whatever the RNG holds now, the checkpoint's state must win
    valid = resumed.train()
    assert last_loss_per_step(killed.out_dir) == reference  # exact, dropout included
    steps = [r["step"] for r in read_metrics(f"{killed.out_dir}/metrics", "train")]
    assert steps == list(range(1, len(reference) + 1))  # steps 11 and 12, logged before the kill, once each
    assert math.isfinite(valid["count"])


def test_a_time_limit_runs_the_schedule_by_the_clock_then_stops_and_a_later_launch_trains_on(tmp_path):
    from glm130b.train.optim import learning_rate

    config = tiny_run_config(tmp_path, time_limit_s=50.0)  # 128 samples; 10 s a step below: 5 steps
    trainer = make_trainer(config)
    trainer.clock = lambda: 10.0 * trainer.state.step
    trainer.train()
    records = read_metrics(f"{config.out_dir}/metrics", "train")
    assert trainer.stopped_early and trainer.state.step == 5 and trainer.state.samples == 4 * 5 < 128
    # step k starts 10 (k - 1) s in, after 4 (k - 1) samples: the warmup (12 samples) counts
    # samples; past it the schedule reads 128 x (k - 1) / 5 samples, ahead of the samples trained,
    # so the last step is well into the decay
    assert config.warmup_samples == 12
    for record in records:
        trained = 4 * (record["step"] - 1)
        clock = trained if trained < 12 else max(trained, int(128 * 10 * (record["step"] - 1) / 50))
        assert record["lr"] == pytest.approx(learning_rate(clock, config))
    assert [r["lr"] for r in records[:3]] == pytest.approx([config.lr * n / 12 for n in (1, 5, 9)])
    assert records[-1]["lr"] < 0.5 * config.lr
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000005"
    # the clock is kept: a launch with the same limit has no time left; without it, the run goes on
    again = make_trainer(config)
    again.train()
    assert again.stopped_early and again.state.step == 5
    unlimited = make_trainer(tiny_run_config(tmp_path, time_limit_s=None))
    unlimited.train()
    assert not unlimited.stopped_early and unlimited.state.samples == 128


def test_validation_is_logged_and_learning_happens(tmp_path):
    config = tiny_run_config(tmp_path)
    trainer = make_trainer(config)
    untrained = trainer.run_validation()["count"]
    final = trainer.train()["count"]
    assert final < 0.5 * untrained  # the counting language is learnable in 20 steps
    # the manual pass at 0, every eval_every (8) steps and at the end (step 20)
    assert [r["step"] for r in read_metrics(f"{config.out_dir}/metrics", "valid")] == [0, 8, 16, 20]


def test_bf16_autocast_learns_on_the_cpu_with_the_official_fp16_rotary_tables(tmp_path):
    """CPU bf16 autocast refuses to concatenate fp16 tensors: the rotary tables are built outside it."""
    config = tiny_run_config(tmp_path, precision="bf16")
    assert config.model_config().rotary_dtype == "fp16"
    trainer = make_trainer(config)
    untrained = trainer.run_validation()["count"]
    assert trainer.train()["count"] < 0.5 * untrained


def test_kill_during_checkpoint_save_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path, train_samples=8 * 4, checkpoint_every=2, rampup_start_batch_size=None)
    trainer = make_trainer(config)
    trainer.train()
    good = latest_checkpoint(tmp_path / "run" / "checkpoints")
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise KeyboardInterrupt("killed after writing the state, before the rename")

    monkeypatch.setattr(torch, "save", dying_save)
    trainer.state.step += 1
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints) == good
    assert [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # the half-written save, hidden
    again = make_trainer(config)
    again.train()  # resumes from the good one (already finished) and clears the half-written save
    assert again.state.step == 4 and all(p.name.startswith("step_") for p in checkpoints.iterdir())


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    config = tiny_run_config(
        tmp_path, train_samples=8 * 6, checkpoint_every=1, keep_checkpoints=2, rampup_start_batch_size=None
    )
    make_trainer(config).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000005", "step_00000006"]


def test_restarting_without_resume_refuses_to_mix_runs(tmp_path):
    config = tiny_run_config(tmp_path, train_samples=8 * 2, rampup_start_batch_size=None)
    make_trainer(config).train()
    with pytest.raises(GLMError, match="resume"):
        make_trainer(tiny_run_config(tmp_path, train_samples=8 * 2, rampup_start_batch_size=None, resume=False)).train()


def test_a_resumed_run_refuses_changed_settings_except_the_safe_ones(tmp_path):
    config = tiny_run_config(tmp_path, train_samples=8 * 2, rampup_start_batch_size=None)
    make_trainer(config).train()
    saved = (tmp_path / "run" / "train_config.yaml").read_text()
    for change, shown in (
        ({"model": {**config.model, "num_layers": 4}}, "model.num_layers 2 -> 4"),
        ({"lr": 1e-3}, "lr 0.003 -> 0.001"),
    ):
        changed = tiny_run_config(tmp_path, train_samples=8 * 2, rampup_start_batch_size=None, **change)
        with pytest.raises(ConfigError, match=re.escape(shown) + ".*--out_dir NEW_DIR"):
            make_trainer(changed).train()
        assert (tmp_path / "run" / "train_config.yaml").read_text() == saved  # the run's record stays
    safe = tiny_run_config(tmp_path, train_samples=8 * 2, rampup_start_batch_size=None, log_every=1, eval_batches=1)
    make_trainer(safe).train()  # how often it logs and what it validates on may change


def test_restart_discards_the_run_in_out_dir_and_nothing_else(tmp_path):
    from glm130b.train.pretrain import discard_run

    config = tiny_run_config(tmp_path, train_samples=8 * 2, rampup_start_batch_size=None)
    make_trainer(config).train()
    notes = tmp_path / "run" / "notes.txt"
    notes.write_text("mine")
    discard_run(tmp_path / "run")  # what `glm130b pretrain --restart` does first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]
    changed = tiny_run_config(tmp_path, train_samples=8 * 2, rampup_start_batch_size=None, lr=1e-3)
    trainer = make_trainer(changed)
    trainer.train()  # a new run: the changed setting is no longer refused
    assert trainer.state.step == 2 and "lr: 0.001" in (tmp_path / "run" / "train_config.yaml").read_text()


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    config = tiny_run_config(
        tmp_path, train_samples=8 * 4, checkpoint_every=2, keep_checkpoints=2, rampup_start_batch_size=None
    )
    make_trainer(config).train()
    reference = last_loss_per_step(config.out_dir)
    newest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = make_trainer(config)
    with pytest.warns(UserWarning, match=re.escape(str(newest)) + " cannot be read"):
        resumed.train()
    assert resumed.state.step == 4  # steps 3 and 4 trained again from step 2's checkpoint
    assert last_loss_per_step(config.out_dir) == reference


def test_fp16_overflow_skips_the_update_and_halves_the_scale(tmp_path):
    # A scale of 2^40 overflows fp16 gradients; hysteresis 1 halves it at every overflow.
    config = tiny_run_config(
        tmp_path,
        precision="fp16",
        initial_loss_scale=2.0**40,
        loss_scale_hysteresis=1,
        train_samples=8 * 3,
        rampup_start_batch_size=None,
        spike_guard={"enabled": False},
    )
    trainer = make_trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    record = trainer.step()
    assert record["skipped_update"] and trainer.scaler.scale == 2.0**39
    assert trainer.state.samples == 0  # the schedule does not advance on a skipped update
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.train()
    records = read_metrics(f"{config.out_dir}/metrics", "train")
    applied = [r for r in records if not r["skipped_update"]]
    assert len(applied) == 3 and all(math.isfinite(r["loss"]) for r in applied)
    assert applied[0]["loss_scale"] < 2.0**40


def test_training_flops_count_every_matmul_weight_and_the_visible_pairs():
    config = GLMConfig.from_preset("glm-tiny")
    model = GLM(config)
    # independent count: every 2-D weight except the embedding lookup, plus the tied head (V x C)
    blocks = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "word_embeddings" not in name)
    head = config.vocab_size * config.hidden_size
    tokens, pairs = 100, 3000
    attention = 2 * 2 * 3 * config.num_layers * config.hidden_size * pairs  # QK^T and PV, fwd + 2 bwd, per pair
    assert training_flops(config, tokens, pairs) == 6 * (blocks + head) * tokens + attention
    # HFU: the recomputed forward of every block (not of the head) comes on top
    assert training_flops(config, tokens, pairs, recompute=True) == (
        training_flops(config, tokens, pairs) + 2 * blocks * tokens + attention / 3
    )


def test_throughput_counts_real_tokens_and_visible_pairs(tmp_path):
    """A step's record: tokens/s over the non-pad tokens, MFU over the FLOPs of those tokens and
    the pairs the mask lets them see; HFU adds the recomputation."""
    batch = CountingSource().micro_batch(0)
    batch.segment_ids[:, LENGTH // 2 :] = 0  # the second half of every row is padding (its prefix is the first quarter)
    work = batch_work([batch])
    n, p = LENGTH // 2, LENGTH // 4  # real tokens per row, prefix
    pairs = p * p + (n - p) * p + (n - p) * (n - p + 1) // 2
    assert work.tolist() == [4 * n, 4 * pairs]
    config = GLMConfig.from_preset("glm-tiny")
    record = throughput(config, work, seconds=2.0, peak_flops=1e12, devices=2, recompute=True)
    assert record["tokens_per_s"] == 4 * n / 2.0
    assert record["mfu"] == pytest.approx(training_flops(config, 4 * n, 4 * pairs) / 2.0 / 1e12 / 2)
    assert record["hfu"] == pytest.approx(training_flops(config, 4 * n, 4 * pairs, recompute=True) / 2.0 / 1e12 / 2)
    assert throughput(config, work, 2.0, None, 1, False)["mfu"] is None  # unknown peak (a CPU): no MFU


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(lr=-1.0), "lr must be a positive number"),
        (dict(global_batch_size=10, micro_batch_size=4), "not a multiple of micro_batch_size"),
        (dict(precision="fp8"), "precision must be one of fp32, bf16, fp16"),
        (dict(min_lr=1.0, lr=0.1), "min_lr 1.0 is above lr"),
        (dict(warmup_fraction=0.95), "warmup_fraction 0.95 exceeds decay_fraction"),
        (dict(rampup_start_batch_size=8192), "rampup_start_batch_size must be between"),
        (dict(train_samples=0), "train_samples must be a positive integer"),
        (dict(model={"num_attention_heads": 7}), "must divide hidden_size"),
        (dict(spike_guard={"window": 0}), "spike_guard.window must be a positive integer"),
        (dict(model_preset="gpt-2"), "model_preset 'gpt-2' is unknown"),
    ],
)
def test_bad_config_values_are_named_with_the_fix(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**fields)


def test_unknown_fields_are_refused():
    with pytest.raises(ConfigError, match="unknown TrainConfig field.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="unknown spike_guard field.*ratio"):
        TrainConfig.from_dict({"spike_guard": {"ratio": 2}})


def test_command_line_overrides_the_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    TrainConfig(model_preset="glm-tiny", sequence_length=64, lr=1e-3, spike_guard={"window": 30}).save(path)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        [
            "--lr",
            "1e-4",
            "--model.hidden_dropout",
            "0",
            "--spike_guard.window",
            "27",
            "--rampup_start_batch_size",
            "null",
        ]
    )
    config = TrainConfig.load(path, overrides_from_args(args))
    assert config.lr == 1e-4 and isinstance(config.lr, float)  # YAML alone would read "1e-4" as text
    assert config.model_config().hidden_dropout == 0.0 and config.spike_guard.window == 27
    assert config.rampup_start_batch_size is None and config.sequence_length == 64  # the file's value kept
    assert TrainConfig.load(path) == TrainConfig(
        model_preset="glm-tiny", sequence_length=64, lr=1e-3, spike_guard={"window": 30}
    )


def test_pretrain_command_reports_user_errors_without_a_traceback(capsys):
    assert cli.main(["pretrain", "--model_preset", "glm-tiny", "--sequence_length", "64"]) == 2
    assert "set corpus" in capsys.readouterr().err
    assert cli.main(["pretrain", "--model_preset", "glm-tiny", "--grad_clip", "-1"]) == 2
    assert "grad_clip must be a number >= 0" in capsys.readouterr().err


def test_pretrain_without_a_model_choice_asks_for_one(capsys, tmp_path):
    assert cli.main(["pretrain", "--corpus", str(tmp_path), "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no model chosen" in err and "--config" in err and "Traceback" not in err


def test_a_model_whose_training_state_cannot_fit_is_refused_before_allocation():
    from glm130b.train.builders import available_memory, check_model_fits

    cpu = torch.device("cpu")
    assert available_memory(cpu) > 0
    with pytest.raises(GLMError, match=r"needs [0-9,.]+ GiB on cpu .* GiB are free.*--config configs/demo.yaml"):
        check_model_fits(GLMConfig.from_preset("glm-130b"), cpu)  # ~1,900 GiB of training state
    check_model_fits(GLMConfig.from_preset("glm-tiny"), cpu)  # fits: no error


@pytest.mark.parametrize("field", ["resume", "tensorboard", "spike_guard.enabled", "parallel.compile"])
def test_booleans_given_as_words_other_than_true_or_false_are_refused(field, capsys):
    assert cli.main(["pretrain", "--model_preset", "glm-tiny", f"--{field}", "maybe"]) == 2
    err = capsys.readouterr().err
    assert f"{field.split('.')[-1]} must be true or false, got 'maybe'" in err


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    losses = {}
    for recompute in (False, True):
        config = tiny_run_config(
            tmp_path,
            f"recompute-{recompute}",
            train_samples=8 * 3,
            rampup_start_batch_size=None,
            parallel={"activation_checkpointing": recompute},
        )
        trainer = make_trainer(config)
        # one process applies parallel.activation_checkpointing too: every block wrapped, or none
        assert all(
            hasattr(block, "_checkpoint_wrapped_module") == recompute for block in trainer.model.transformer.layers
        )
        trainer.train()
        losses[recompute] = last_loss_per_step(config.out_dir)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)  # dropout replayed identically in the recompute
    assert load_model(tmp_path / "recompute-True" / "checkpoints" / "step_00000003").config.num_layers == 2


def test_old_top_level_activation_checkpointing_sets_the_parallel_field_with_a_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model_preset: glm-tiny\nsequence_length: 64\nactivation_checkpointing: true\n")
    with pytest.warns(FutureWarning, match="parallel.activation_checkpointing"):
        config = TrainConfig.load(path)
    assert config.parallel.activation_checkpointing is True
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--activation_checkpointing", "true"])  # the old command-line spelling
    with pytest.warns(FutureWarning, match="deprecated"):
        config = TrainConfig.from_dict(apply_overrides({"sequence_length": 64}, overrides_from_args(args)))
    assert config.parallel.activation_checkpointing is True
    config.save(tmp_path / "new.yaml")  # written back in its one place
    saved = yaml.safe_load((tmp_path / "new.yaml").read_text())
    assert "activation_checkpointing" not in saved and saved["parallel"]["activation_checkpointing"] is True
    with pytest.raises(ConfigError, match="contradicts parallel.activation_checkpointing"), pytest.warns(FutureWarning):
        TrainConfig.from_dict({"activation_checkpointing": True, "parallel": {"activation_checkpointing": False}})


def test_csv_metrics_read_back_like_json_lines(tmp_path):
    records = {}
    for fmt in ("jsonl", "csv"):
        config = tiny_run_config(tmp_path, fmt, train_samples=8 * 2, rampup_start_batch_size=None, metrics_format=fmt)
        make_trainer(config).train()
        records[fmt] = read_metrics(tmp_path / fmt / "metrics", "train")
    assert (tmp_path / "csv" / "metrics" / "train.csv").is_file()
    for from_json, from_csv in zip(records["jsonl"], records["csv"]):
        assert from_csv["step"] == from_json["step"] and from_csv["mfu"] is None
        assert from_csv["loss"] == pytest.approx(from_json["loss"], rel=1e-12)


def test_the_scored_positions_loss_equals_the_full_logits_loss():
    from glm130b.objective.loss import masked_lm_loss_sum
    from glm130b.train.step import batch_loss_sum
    from tests.train.helpers import CountingSource

    torch.manual_seed(0)
    model = GLM(GLMConfig.from_preset("glm-tiny", vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0))
    batch = CountingSource(micro_batch_size=3).micro_batch(0)
    batch.loss_mask[1, 5:9] = 0.0  # an uneven pattern of scored positions
    full = model(batch.input_ids, batch.position_ids, batch.compact_mask())
    expected = masked_lm_loss_sum(full, batch.targets, batch.loss_mask)
    assert torch.allclose(batch_loss_sum(model, batch, "fp32"), expected, rtol=1e-6, atol=1e-5)
    at = torch.tensor([0, 7, 40])
    picked = model(batch.input_ids, batch.position_ids, batch.compact_mask(), logits_where=at)
    assert torch.allclose(picked, full.flatten(0, 1)[at], atol=1e-5)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_metrics_forget_the_steps_after_a_resumed_checkpoint(tmp_path, fmt):
    log = MetricsLog(tmp_path, fmt, tensorboard=False)
    for step in range(1, 6):
        log.write("train", {"step": step, "loss": 1.0 / step})
    log.write("valid", {"step": 4, "count": 2.5})
    log.forget_after(3)
    log.write("train", {"step": 4, "loss": 0.3})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path, "train")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.3),
    ]
    assert read_metrics(tmp_path, "valid") == []
