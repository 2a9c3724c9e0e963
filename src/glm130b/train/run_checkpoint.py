"""Checkpoints of a training run, `<out_dir>/checkpoints/step_XXXXXXXX/`: what they hold, writing
them whole or not at all, finding the newest, and restoring a run from one.

One process: the model directory of glm130b.checkpoint plus `trainer_state.pt`; when part of the
model is frozen (an adapter fine-tune), `trainable.safetensors` in place of the model directory: the
frozen base never changes, and the run rebuilds it from its own directory on resume. Under torchrun: a
torch.distributed.checkpoint (DCP) directory written by every rank, which resumes under any other
layout. Both are written under a hidden temporary name and published by a rename
(core.atomic.publish_directory), so a kill during a save leaves the previous one loadable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from glm130b.checkpoint.model_dir import WEIGHTS_FILE, save_model
from glm130b.core.atomic import TEMPORARY_MARK, publish_directory, temporary_path
from glm130b.core.errors import CheckpointError
from glm130b.distributed.parallelize import load_checkpoint, save_checkpoint

STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
DCP_METADATA = ".metadata"  # the file that marks a torch.distributed.checkpoint directory
CHECKPOINT_PREFIX = "step_"


@dataclass
class RunState:
    """What a checkpoint restores, besides model, optimizer and RNG."""

    step: int = 0
    samples: int = 0  # samples whose update was applied: the schedule's clock
    seconds: float = 0.0  # of training, over every launch: the clock of config.time_limit_s
    data_position: int = 0  # index of the next micro-batch to draw
    # Kept across rollbacks (the guard's memory of what it already did):
    skipped: list[list[int]] = field(default_factory=list)  # [start, end) micro-batch ranges never used
    lr_factor: float = 1.0
    embedding_grad_scale_factor: float = 1.0
    rollbacks: int = 0

    def used_micro_batches(self) -> list[int]:
        """Indices of the micro-batches whose updates the model kept: all drawn so far, less the
        ranges the spike guard skipped."""
        used = []
        for index in range(self.data_position):
            if not any(start <= index < end for start, end in self.skipped):
                used.append(index)
        return used


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are hidden)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


class RunCheckpoints:
    """The checkpoints folder of a run. `state` (what save writes besides model, optimizer and RNG)
    is a JSON-able dict: the run state, loss scaler, spike guard and config.

    mesh: the DeviceMesh of a torchrun launch (DCP checkpoints, every rank takes part in save and
    load); None = one process. flatten_optimizer: key the optimizer state by parameter name, as
    pipeline stages need (glm130b.distributed.parallelize.save_checkpoint)."""

    def __init__(self, directory: Path, keep: int, mesh=None, flatten_optimizer: bool = False):
        self.directory, self.keep, self.mesh = Path(directory), keep, mesh
        self.flatten_optimizer = flatten_optimizer
        self.is_main = mesh is None or dist.get_rank() == 0

    def path(self, step: int) -> Path:
        return self.directory / f"{CHECKPOINT_PREFIX}{step:08d}"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.directory)

    def remove_unfinished(self) -> None:
        """Delete the temporary directories of saves cut short by a kill (rank 0)."""
        if self.is_main and self.directory.is_dir():
            for unfinished in self.directory.glob(f".*{TEMPORARY_MARK}*"):
                shutil.rmtree(unfinished, ignore_errors=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write step_<step> (replacing one of the same step) and prune all but the newest `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        if self.mesh is not None:
            self._save_distributed(final, model, optimizer, state)
            return final
        tmp = temporary_path(final)
        shutil.rmtree(tmp, ignore_errors=True)
        trainable = trainable_state(model)
        if trainable is None:
            save_model(model, tmp, metadata={"step": str(step)})
        else:
            tmp.mkdir(parents=True)
            save_file(trainable, str(tmp / TRAINABLE_FILE), metadata={"step": str(step)})
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({**state, "optimizer": optimizer.state_dict(), "rng": rng}, tmp / STATE_FILE)
        self._publish(tmp, final)
        return final

    def _save_distributed(self, final: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Every rank writes its shards into one temporary directory (the same name on every rank,
        so without the pid); rank 0 publishes it after all have finished. Each rank's RNG is
        stored under its own key; the state goes in as JSON text, one object whatever its size."""
        tmp = final.with_name(f".{final.name}{TEMPORARY_MARK}")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        extra = {"trainer": json.dumps(state), f"rng_rank{dist.get_rank()}": _rng_json()}
        save_checkpoint(tmp, model, optimizer, extra=extra, flatten_optimizer=self.flatten_optimizer)
        dist.barrier()
        if self.is_main:
            self._publish(tmp, final)
        dist.barrier()

    def _publish(self, tmp: Path, final: Path) -> None:
        publish_directory(tmp, final)
        for old in list_checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> tuple[dict, bool]:
        """Restore model, optimizer and this rank's RNG in place; returns the saved `state` and
        whether the RNG came back (a rank the saving launch did not have gets none)."""
        distributed_checkpoint = (directory / DCP_METADATA).is_file()
        if distributed_checkpoint != (self.mesh is not None):
            written, needed = (
                ("by a torchrun launch", "under torchrun (--nproc_per_node 1 works)")
                if distributed_checkpoint
                else ("by a single-process run", "with one process")
            )
            raise CheckpointError(f"{directory} was written {written}; resume it {needed}, or start a new out_dir")
        if self.mesh is not None:
            return self._load_distributed(directory, model, optimizer)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        if (directory / TRAINABLE_FILE).is_file():
            load_trainable(model, load_file(str(directory / TRAINABLE_FILE), device=str(device)), directory)
        else:
            model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device)))
        optimizer.load_state_dict(state.pop("optimizer"))
        rng = state.pop("rng")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return state, True

    def _load_distributed(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict, bool]:
        import torch.distributed.checkpoint as dcp  # deferred: ~0.5 s to import (see distributed/parallelize.py)

        rng_key = f"rng_rank{dist.get_rank()}"
        saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        wanted = {"trainer": ""} | ({rng_key: ""} if f"extra.{rng_key}" in saved else {})
        extra = load_checkpoint(directory, model, optimizer, extra=wanted)
        if rng_key not in wanted:
            return json.loads(extra["trainer"]), False
        rng = json.loads(extra[rng_key])
        torch.set_rng_state(torch.tensor(rng["cpu"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
        return json.loads(extra["trainer"]), True


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable parameters by state-dict key when part of the model is frozen; None when
    every tensor trains (then the whole model is the checkpoint)."""
    state = model.state_dict(keep_vars=True)
    trainable = {
        k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, nn.Parameter) and v.requires_grad
    }
    return None if len(trainable) == len(state) else trainable


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    wanted = set(trainable_state(model) or {})
    if set(state) != wanted:
        wrong = sorted(set(state) ^ wanted)
        raise CheckpointError(
            f"{directory} holds other trainable tensors than this run's model (first "
            f"mismatch: {wrong[0]}); resume with the same method and settings, or start a new out_dir"
        )
    model.load_state_dict(state, strict=False)


def _rng_json() -> str:
    """This rank's RNG (CPU, and its own CUDA device), as JSON text."""
    rng = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state().tolist()
    return json.dumps(rng)
