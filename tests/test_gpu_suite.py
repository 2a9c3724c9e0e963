"""benchmarks/gpu_suite.sh at toy sizes on the CPU: every benchmark of its list runs its checks and
records a computed figure, and the suite prints one table with a row per benchmark (the plumbing
the GPU run relies on; the figures themselves mean nothing here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def listed_benchmarks() -> list[str]:
    block = SUITE.read_text().split("BENCHMARKS=(", 1)[1].split("\n)", 1)[0]
    return re.findall(r'^\s*"([^|"]+)\|', block, flags=re.M)


def test_suite_runs_every_benchmark_at_small_size_and_prints_one_table(tmp_path):
    names = listed_benchmarks()
    assert {"quant_kernels", "generation", "prefix_attention", "train_mfu"} <= set(names)
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SUITE), "--small", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| benchmark |") :]
    for name in names:
        rows = [line for line in table.splitlines() if line.startswith(f"| {name} | ok |")]
        assert rows, f"no row for {name}:\n{table}"
        for row in rows:
            value = row.split(" | ")[4]
            assert re.match(r"^[0-9][0-9,.e+-]*( |$)", value), f"{name}: no computed figure in {row}"
    assert (tmp_path / "summary" / "train_mfu.json").is_file() and (tmp_path / "train_mfu.log").is_file()


def test_suite_refuses_budgets_over_nine_minutes(tmp_path):
    """A benchmark added with a budget that breaks the 9-minute total stops the suite before anything runs."""
    script = tmp_path / "gpu_suite.sh"
    text = SUITE.read_text().replace("TOTAL_BUDGET_S=540", "TOTAL_BUDGET_S=60")
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_suite.sh"
    script.write_text(text)
    done = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "over the 60 s the suite may take" in done.stderr


def test_serve_benchmark_script_runs_at_small_size_and_records_its_figures(tmp_path):
    """benchmarks/gpu_serve.sh (the serving benchmark, outside the suite's 9 minutes) at toy size:
    the real server answers at concurrency 1, 8 and 32 and both goal figures are computed."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "WHEELS_DIR": str(tmp_path / "no_wheels")}
    script = SUITE.parent / "gpu_serve.sh"
    done = subprocess.run(
        ["bash", str(script), "--small", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^\| 32 \| 64 \| [0-9,]+ \|", done.stdout, flags=re.M), done.stdout
    figures = json.loads((tmp_path / "summary" / "serve.json").read_text())
    assert len(figures) == 2 and all(isinstance(f["value"], float) and f["value"] > 0 for f in figures), figures
