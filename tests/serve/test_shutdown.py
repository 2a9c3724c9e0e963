"""`glm130b serve` in a subprocess: SIGTERM lets the running request finish, then the process exits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port
from tests.serve.conftest import MODEL_NAME

SRC = Path(__file__).resolve().parents[2] / "src"
STARTUP_S = 120  # importing torch and FastAPI on a busy 2-core machine can take tens of seconds


def test_sigterm_drains_the_running_request_before_exit(model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glm130b.cli",
            "serve",
            "--model",
            str(model_dir),
            "--model-name",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
            "--max-batch",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 450, "ignore_eos": True, "stream": True}
        text, finish, done = "", None, False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                if not text and finish is None:
                    process.send_signal(signal.SIGTERM)  # mid-request: the first event has arrived
                if line == "data: [DONE]":
                    done = True
                    break
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
        # "length": all 450 tokens came (counting characters cannot tell: byte tokens can merge into one)
        assert done and finish == "length" and text
        # uvicorn re-raises the signal once its graceful shutdown is over, so supervisors see it
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = process.stdout.read()
        # uvicorn prints this only when a connection was still open as it began to shut down
        assert "Waiting for connections to close" in log, log
        assert "Application shutdown complete" in log, log  # the engine stopped cleanly
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("the server still answers after SIGTERM")
        except httpx.TransportError:
            pass
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
