"""Fixtures of the data tests: a stub tokenizer folder and a small trained tokenizer."""

from pathlib import Path

import pytest

from glm130b.tokenizer.tokenizers import train_tokenizer
from tests.data.helpers import make_stub, random_texts


@pytest.fixture
def stub(tmp_path) -> Path:
    return make_stub(tmp_path / "stub")


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(random_texts(200, 5) + random_texts(200, 6, "zh"), directory, vocab_size=400, num_threads=1)
    return directory
