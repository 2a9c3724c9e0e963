"""Fixtures of the fine-tuning tests: one CPU thread, and the toy task with its trained base model
(glm130b.finetune.toy_task), built once per test session (shared by the xdist workers through a lock)."""

from pathlib import Path

import pytest
import torch
from filelock import FileLock

from glm130b.finetune.toy_task import ToyTask, build_toy_task


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def task(tmp_path_factory, worker_id) -> ToyTask:
    # Under xdist every worker has its own basetemp inside the session's: the parent is shared.
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root = Path(shared) / "finetune-task"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FileLock(str(root) + ".lock"):
            done = root / "done"
            if not done.exists():
                root.mkdir(parents=True, exist_ok=True)
                build_toy_task(root)
                done.write_text("ok")
    finally:
        torch.set_num_threads(before)
    return ToyTask.load(root)
