"""Fixtures of the serving tests: the tiny model directory, its reference objects, a running server."""

import pytest
import torch

from glm130b.checkpoint.model_dir import load_model
from glm130b.serve.app import create_app
from glm130b.serve.engine import Engine
from glm130b.tokenizer.tokenizers import load_tokenizer
from tests.serve.helpers import ServerThread, write_model_dir

MODEL_NAME = "glm-tiny-reverser"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread (two can be far slower when the cores are busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("served") / MODEL_NAME)


@pytest.fixture(scope="session")
def reference(model_dir):
    """The model and tokenizer loaded on their own: what glm130b.generate runs for the expected answers."""
    return load_model(model_dir), load_tokenizer(model_dir / "tokenizer")


def start_server(model_dir, **engine_options) -> ServerThread:
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir / "tokenizer")
    app_options = {k: engine_options.pop(k) for k in ("request_timeout", "max_body_bytes") if k in engine_options}
    engine = Engine(model, tokenizer, **{"max_batch": 4, "max_queue": 32, **engine_options})
    server = ServerThread(create_app(engine, MODEL_NAME, **app_options))
    server.engine = engine
    return server


@pytest.fixture(scope="module")
def server(model_dir):
    """A real server (uvicorn in a thread) on 127.0.0.1: 4 rows, 32 queued sequences, 4 KiB bodies."""
    server = start_server(model_dir, max_body_bytes=4096)
    yield server
    server.stop()
