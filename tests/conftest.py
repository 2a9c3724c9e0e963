"""pytest set-up shared by every test: the Triton interpreter switch and common fixtures (helpers.py holds
the plain helper functions)."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. Triton reads the
# switch when a kernel is decorated, i.e. when the first test module imports glm130b.kernels, so it
# is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from glm130b import GLMConfig


@pytest.fixture
def tiny_config() -> GLMConfig:
    return GLMConfig.from_preset("glm-tiny", hidden_dropout=0.0, attention_dropout=0.0)
