"""Fixtures of the generation tests: one CPU thread, and the tiny model trained on the toy tasks."""

import pytest
import torch

from tests.generate.helpers import train_reverser


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids oversubscribing a shared CPU (a 2-thread matmul
    of this size can be 100x slower than 1 thread when the cores are busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained():
    """Trained once per test process, shared by the decode, API and command-line tests. A session
    fixture is set up before the module's `one_thread`, so it takes one thread itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_reverser()
    finally:
        torch.set_num_threads(before)
