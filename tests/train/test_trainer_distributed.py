"""The trainer under torch.distributed (2 CPU processes, gloo): data parallel, tensor parallel and
pipeline parallel reproduce the single-process losses, and a checkpoint written by 2 processes resumes with 1.

Each worker takes the launch path of `glm130b pretrain` under torchrun (RANK etc. in the
environment, then train.builders.build_model_and_optimizer) and trains on the counting language of
tests/train/test_trainer.py. The reference is the plain single-process Trainer on the same micro-batches.
Without dropout, `pretrain`'s attention_backend auto is the prefix-LM kernel on the compact mask
(the SDPA loop on a CPU), so every layout here runs it; the single process also runs once on the
dense SDPA path, which it must match.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm130b.checkpoint.model_dir import load_model
from glm130b.model.attention import describe_backend
from glm130b.train.builders import build_model_and_optimizer
from glm130b.train.metrics import read_metrics
from glm130b.train.pretrain import export_model
from glm130b.train.trainer import Trainer
from tests.helpers import free_port
from tests.train.helpers import CountingSource, last_loss_per_step, make_trainer, tiny_run_config

STEPS = 6
RESUME_FROM = 3  # checkpoint_every: the 2-process run leaves step_3 and step_6
# fp32 on CPU: a parallel run differs from the single process only in the order of floating-point
# sums (gradient reduction over ranks, matmuls split over tp shards, the token count all-reduced),
# relative ~1e-7 per operation; six AdamW steps at lr 3e-3 carry that to ~1e-6 in the loss.
RTOL, ATOL = 1e-4, 1e-5
# tests/test_spike_guard.py's injected failure: micro-batch 30 (step 16) has random targets.
SPIKE = dict(train_samples=8 * 24, spike_guard={"window": 10, "min_history": 5}, lr=1e-2)
BAD = {30}


def run_config(tmp_path, name, **overrides):
    """The counting run of test_trainer without dropout (each rank draws its own masks, so only
    dropout-free losses can match a single process) and without ramp-up (every step 2 micro-batches,
    one per dp rank)."""
    settings = dict(
        model=dict(vocab_size=64, max_sequence_length=32, hidden_dropout=0.0, attention_dropout=0.0),
        train_samples=8 * STEPS,
        rampup_start_batch_size=None,
        eval_every=100,
        checkpoint_every=RESUME_FROM,
    )
    return tiny_run_config(tmp_path, name, **{**settings, **overrides})


def _train(config, bad=()):
    """What run_pretraining does with the model, on the counting source instead of a corpus."""
    built = build_model_and_optimizer(config)
    valid = {"count": [CountingSource(seed=99).micro_batch(i) for i in range(2)]}
    trainer = Trainer(config, built, CountingSource(bad=bad), valid, show_progress=False)
    trainer.train()
    export_model(trainer, Path(config.out_dir) / "model", metadata={})


def _worker(rank: int, world: int, port: int, tmp_path: str, layouts: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    for overrides in layouts:
        bad = overrides.pop("bad", ())
        _train(run_config(Path(tmp_path), device="cpu", **overrides), bad)
    dist.destroy_process_group()


def _launch(world: int, tmp_path, layouts: list[dict]) -> None:
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), layouts), nprocs=world, join=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("distributed")
    torch.set_num_threads(1)
    reference = make_trainer(run_config(tmp_path, "single"))
    assert describe_backend(reference.model.config, reference.device).startswith("prefix-LM kernel loop")
    reference.train()
    dense = dict(
        vocab_size=64, max_sequence_length=32, hidden_dropout=0.0, attention_dropout=0.0, attention_backend="sdpa"
    )
    make_trainer(run_config(tmp_path, "single_sdpa", model=dense)).train()
    export_model(reference, tmp_path / "single" / "model", metadata={})
    make_trainer(run_config(tmp_path, "single_spike", **SPIKE), CountingSource(bad=BAD)).train()
    _launch(
        2,
        tmp_path,
        [
            dict(name="dp", parallel=dict(dp=2)),
            dict(name="tp", parallel=dict(tp=2, dp=1)),
            dict(name="pp", parallel=dict(pp=2, dp=1, pp_microbatches=4)),
            dict(name="dp_spike", parallel=dict(dp=2), bad=BAD, **SPIKE),
        ],
    )
    # The 2-process data-parallel run, cut back to its step-3 checkpoint, resumed by 1 process.
    shutil.copytree(tmp_path / "dp", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / f"step_{STEPS:08d}")
    _launch(1, tmp_path, [dict(name="resumed")])
    # The pipelined run, cut back to step 3 and resumed by the pipeline (each stage's optimizer state),
    # with the default pp_microbatches (one per micro-batch: 2) instead of the 4 it was written with.
    shutil.copytree(tmp_path / "pp", tmp_path / "pp_resumed")
    shutil.rmtree(tmp_path / "pp_resumed" / "checkpoints" / f"step_{STEPS:08d}")
    _launch(2, tmp_path, [dict(name="pp_resumed", parallel=dict(pp=2, dp=1))])
    return tmp_path, last_loss_per_step(tmp_path / "single")


def losses(out_dir, steps) -> torch.Tensor:
    per_step = last_loss_per_step(out_dir)
    return torch.tensor([per_step[s] for s in steps])


def test_prefix_attention_run_matches_the_dense_sdpa_run(runs):
    tmp_path, _ = runs
    steps = list(range(1, STEPS + 1))
    torch.testing.assert_close(
        losses(tmp_path / "single", steps), losses(tmp_path / "single_sdpa", steps), rtol=RTOL, atol=ATOL
    )


def test_data_parallel_reproduces_single_process_losses(runs):
    tmp_path, reference = runs
    steps = list(range(1, STEPS + 1))
    assert sorted(reference) == steps
    assert reference[STEPS] < reference[1] - 0.5  # training moved, so matching losses mean matching updates
    torch.testing.assert_close(losses(tmp_path / "dp", steps), losses(tmp_path / "single", steps), rtol=RTOL, atol=ATOL)


def test_tensor_parallel_reproduces_single_process_losses(runs):
    tmp_path, _ = runs
    steps = list(range(1, STEPS + 1))
    torch.testing.assert_close(losses(tmp_path / "tp", steps), losses(tmp_path / "single", steps), rtol=RTOL, atol=ATOL)


def test_two_process_checkpoint_resumes_with_one_process(runs):
    tmp_path, _ = runs
    logged_steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics", "train")]
    # the copied 2-process records up to the checkpoint, then the resumed run's: each step once
    assert logged_steps == list(range(1, STEPS + 1))
    steps = list(range(RESUME_FROM + 1, STEPS + 1))
    torch.testing.assert_close(
        losses(tmp_path / "resumed", steps), losses(tmp_path / "single", steps), rtol=RTOL, atol=ATOL
    )


def test_exported_models_hold_the_single_process_weights(runs):
    tmp_path, _ = runs
    reference = load_model(tmp_path / "single" / "model").state_dict()
    for name in ("dp", "tp", "pp"):
        exported = load_model(tmp_path / name / "model").state_dict()
        assert exported.keys() == reference.keys()  # official names: GeGLU halves merged back
        for key, value in reference.items():
            torch.testing.assert_close(exported[key], value, rtol=RTOL, atol=ATOL, msg=f"{name} {key}")


def test_spike_guard_rolls_back_like_the_single_process(runs):
    tmp_path, _ = runs
    [reference] = read_metrics(tmp_path / "single_spike" / "metrics", "intervention")
    [event] = read_metrics(tmp_path / "dp_spike" / "metrics", "intervention")  # rank 0 alone writes it
    assert (event["step"], event["rolled_back_to"]) == (reference["step"], reference["rolled_back_to"]) == (16, 15)
    steps = list(range(1, 25))
    torch.testing.assert_close(
        losses(tmp_path / "dp_spike", steps), losses(tmp_path / "single_spike", steps), rtol=RTOL, atol=ATOL
    )


def test_only_rank_zero_writes_and_checkpoints_are_complete(runs):
    tmp_path, _ = runs
    checkpoints = sorted(p.name for p in (tmp_path / "dp" / "checkpoints").iterdir())
    assert checkpoints == [f"step_{RESUME_FROM:08d}", f"step_{STEPS:08d}"]  # no .tmp- left, oldest pruned
    assert len(read_metrics(tmp_path / "dp" / "metrics", "train")) == STEPS  # one record per step, not per rank


def test_pipeline_parallel_reproduces_single_process_losses(runs):
    """pp=2: each step's 2 micro-batches go through the 1F1B schedule as 4 pieces of 2 sequences;
    its step-3 checkpoint, resumed by the pipeline with the default of one pipeline microbatch per
    micro-batch (2 pieces of 4), continues on the single-process losses."""
    tmp_path, _ = runs
    steps = list(range(1, STEPS + 1))
    torch.testing.assert_close(losses(tmp_path / "pp", steps), losses(tmp_path / "single", steps), rtol=RTOL, atol=ATOL)
    steps = list(range(RESUME_FROM + 1, STEPS + 1))
    torch.testing.assert_close(
        losses(tmp_path / "pp_resumed", steps), losses(tmp_path / "single", steps), rtol=RTOL, atol=ATOL
    )
    valid, reference = (read_metrics(tmp_path / name / "metrics", "valid")[-1] for name in ("pp", "single"))
    torch.testing.assert_close(valid["loss_count"], reference["loss_count"], rtol=RTOL, atol=ATOL)
