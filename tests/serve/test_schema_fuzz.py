"""Schemathesis against the real server's OpenAPI schema: generated valid and invalid requests to
every route get no 5xx. Bounded: a fixed seed, 25 examples per operation, no shrinking."""

import subprocess
import sys

from tests.serve.conftest import start_server

FUZZ_TIMEOUT_S = 240  # ~300 requests take ~10 s on an idle core; the limit only guards a hang


def test_schemathesis_finds_no_server_error(model_dir, tmp_path):
    server = start_server(model_dir, max_body_bytes=4096)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "25",
                "--seed",
                "1",
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--no-shrink",
            ],
            capture_output=True,
            text=True,
            timeout=FUZZ_TIMEOUT_S,
            cwd=tmp_path,
        )  # its cache dir goes there
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert "No issues found" in result.stdout
        assert server.engine.running == 0
    finally:
        server.stop()
