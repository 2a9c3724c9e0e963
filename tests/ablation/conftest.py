"""Fixtures of the ablation tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """The tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
