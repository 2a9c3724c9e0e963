"""Exact resume of a LoRA fine-tune: killed inside a step and restarted from its newest
checkpoint, it logs the losses of the uninterrupted run bit for bit (adapter dropout on) and ends
with the same adapter; its checkpoints hold the adapter and the optimizer, not the frozen base."""

import pytest
import torch
from safetensors.torch import load_file

from glm130b.adapters.lora import WEIGHTS_FILE
from glm130b.finetune.config import FinetuneConfig
from glm130b.finetune.packing import PackedDataset
from glm130b.finetune.runner import run_finetune
from glm130b.train.metrics import read_metrics
from glm130b.train.run_checkpoint import TRAINABLE_FILE, latest_checkpoint
from tests.finetune.helpers import RUN

STEPS, EVERY, KILL_AT = 12, 4, 9  # micro-batch 9 is step 10's: the run dies after the step-8 checkpoint


def config(task, out_dir):
    return FinetuneConfig.from_dict(
        {
            "model": str(task.base),
            "data": str(task.train),
            "method": "lora",
            "out_dir": str(out_dir),
            "lora_dropout": 0.1,
            "train": {**RUN, "lr": 1e-2, "train_samples": STEPS * 8, "checkpoint_every": EVERY},
        }
    )


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics", "train")}  # the last per step


def test_killed_and_resumed_finetune_reproduces_the_uninterrupted_run(task, tmp_path, monkeypatch):
    straight = run_finetune(config(task, tmp_path / "straight"), show_progress=False)
    reference = losses(tmp_path / "straight")
    assert sorted(reference) == list(range(1, STEPS + 1))

    original = PackedDataset.micro_batch

    def dying(self, index):
        if index == KILL_AT:
            raise KeyboardInterrupt("simulated kill")
        return original(self, index)

    monkeypatch.setattr(PackedDataset, "micro_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config(task, tmp_path / "killed"), show_progress=False)
    checkpoint = latest_checkpoint(tmp_path / "killed" / "checkpoints")
    assert checkpoint.name == "step_00000008"
    saved = load_file(str(checkpoint / TRAINABLE_FILE))
    assert saved and all("lora_" in k for k in saved)
    assert not (checkpoint / "model.safetensors").exists()

    monkeypatch.undo()
    torch.manual_seed(12345)  # whatever the RNG holds now, the checkpoint's state must win
    resumed = run_finetune(config(task, tmp_path / "killed"), show_progress=False)
    assert losses(tmp_path / "killed") == reference
    ours, theirs = (load_file(str(r.output_dir / WEIGHTS_FILE)) for r in (resumed, straight))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
