"""Running a grid: each unfinished run trained by the project's Trainer, one after another or one
worker process per device. A run is finished once its result.json exists; finished runs are never
trained again, and an interrupted one continues from its last checkpoint."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glm130b.ablation.grid import Grid, GridRun
from glm130b.core.config_io import read_mapping, write_mapping
from glm130b.core.errors import GLMError
from glm130b.objective.batch import TrainingBatch
from glm130b.train.builders import build_model_and_optimizer
from glm130b.train.config import TrainConfig
from glm130b.train.data_setup import BatchSource
from glm130b.train.pretrain import load_run_data
from glm130b.train.trainer import RUN_CONFIG_FILE, Trainer, TrainingDiverged

RESULT_FILE = "result.json"


@dataclass
class RunData:
    """What every run of a grid trains and validates on."""

    train: BatchSource
    valid: dict[str, list[TrainingBatch]]

    @classmethod
    def load(cls, config: TrainConfig) -> RunData:
        """The corpus and validation batches of `config` (its tokenizer checked against the model)."""
        _, train, valid = load_run_data(config)
        return cls(train, valid)


def run_folder(run: GridRun) -> Path:
    return Path(run.config.out_dir)


def read_result(run: GridRun) -> dict | None:
    """The result of a finished run, None while it is not finished."""
    path = run_folder(run) / RESULT_FILE
    return read_mapping(path, "run result") if path.is_file() else None


def check_folder(run: GridRun) -> None:
    """Refuse a run folder that holds a run of another config: keeping its results would mix grids."""
    path = run_folder(run) / RUN_CONFIG_FILE
    if not path.is_file():
        return
    saved, planned = _flat(read_mapping(path, "TrainConfig")), _flat(run.config.to_dict())
    differs = [k for k in sorted(saved.keys() | planned.keys()) if k != "device" and saved.get(k) != planned.get(k)]
    if differs:
        key = differs[0]
        raise GLMError(
            f"{run_folder(run)} holds a run of another base config or grid ({key}: {saved.get(key)!r} "
            f"there, {planned.get(key)!r} now); use a new --out, or delete that folder to train it again"
        )


def _flat(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def train_run(run: GridRun, data: RunData, show_progress: bool = False) -> dict:
    """Train one run to its end (resuming when it has a checkpoint), write result.json, drop its
    checkpoints (the report reads only metrics and results). A run the spike guard gives up on
    (TrainingDiverged) is finished too, with the reason in `stopped`."""
    started = time.perf_counter()
    trainer = Trainer(
        run.config, build_model_and_optimizer(run.config), data.train, data.valid, show_progress=show_progress
    )
    stopped = None
    try:
        valid = trainer.train()
    except TrainingDiverged as err:
        valid, stopped = {}, str(err)
        trainer.metrics.close()
    result = {
        "name": run.name,
        "setting": run.setting,
        "seed": run.config.seed,
        "steps": trainer.state.step,
        "parameters": trainer.model.num_parameters(),
        "valid_loss": valid,
        "stopped": stopped,
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(trainer.device),
    }
    write_mapping(run_folder(run) / RESULT_FILE, result)  # atomic: from here on the run is finished
    shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    return result


def run_grid(
    grid: Grid,
    data: RunData | None = None,
    devices: list[str] | None = None,
    on_finished: Callable[[GridRun, dict], None] | None = None,
    show_progress: bool = False,
) -> list[GridRun]:
    """Train every unfinished run of `grid`; returns the runs trained now. `data`: None = the base
    config's corpus. `devices`: None = the base config's device; several = one worker process per
    device, each taking the next unfinished run. `on_finished(run, result)` after each run."""
    if "RANK" in os.environ:
        raise GLMError(
            "glm130b ablate trains each run in one process; instead of launching it with torchrun, "
            "pass --devices cuda:0,cuda:1,... to train one run per GPU"
        )
    runs = grid.runs()
    for run in runs:
        check_folder(run)
    todo = [run for run in runs if read_result(run) is None]
    on_finished = on_finished or (lambda run, result: None)
    if devices and len(devices) > 1:
        _run_on_devices(todo, devices, data, on_finished)
        return todo
    data = data or (RunData.load(grid.base) if todo else None)
    for run in todo:
        if devices:
            run = dataclasses.replace(run, config=dataclasses.replace(run.config, device=devices[0]))
        on_finished(run, train_run(run, data, show_progress))
    return todo


def _run_on_devices(
    todo: list[GridRun], devices: list[str], data: RunData | None, on_finished: Callable[[GridRun, dict], None]
) -> None:
    context = multiprocessing.get_context("spawn")  # a forked child cannot use CUDA
    pending, done = context.Queue(), context.Queue()
    for run in todo:
        pending.put(run)
    for _ in devices:
        pending.put(None)  # one stop sign per worker
    workers = [context.Process(target=_worker, args=(device, pending, done, data), daemon=True) for device in devices]
    for worker in workers:
        worker.start()
    by_name = {run.name: run for run in todo}
    try:
        for _ in todo:
            name, device, outcome = _next_outcome(done, workers)
            if isinstance(outcome, str):
                raise GLMError(f"run {name} failed on {device}:\n{outcome}")
            on_finished(by_name[name], outcome)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # only after a failure or an interrupt; their runs resume later
            worker.join()


def _next_outcome(done, workers) -> tuple[str, str, dict | str]:
    while True:
        try:
            return done.get(timeout=1.0)
        except queue.Empty:
            if not any(worker.is_alive() for worker in workers):
                try:  # a worker's last message is flushed before it exits
                    return done.get(timeout=1.0)
                except queue.Empty:
                    raise GLMError(
                        "the worker processes exited before the grid was done "
                        "(killed? out of memory?); run the command again to continue"
                    ) from None


def _worker(device: str, pending, done, data: RunData | None) -> None:
    """One device's loop: train the next run from `pending` until a stop sign; report each result,
    or the traceback of a failure (then stop)."""
    name = "?"
    try:
        for run in iter(pending.get, None):
            name = run.name
            data = data or RunData.load(run.config)
            run = dataclasses.replace(run, config=dataclasses.replace(run.config, device=device))
            done.put((name, device, train_run(run, data)))
    except Exception:
        done.put((name, device, traceback.format_exc()))
