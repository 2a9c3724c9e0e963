"""Grids of a tiny model trained for real on the CPU: the report holds every run, an interrupted
grid resumes without training finished runs again, a folder of another grid is refused, and one
worker process per device trains the same runs."""

import json
import re

import pytest

from glm130b.ablation.report import write_grid_report
from glm130b.ablation.runner import RESULT_FILE, run_folder, run_grid
from glm130b.ablation.spikes import SpikeRule
from glm130b.core.errors import GLMError
from glm130b.train.metrics import read_metrics
from tests.ablation.helpers import STEPS, counting_data, tiny_grid
from tests.train.helpers import CountingSource

RULE = SpikeRule(window=10, min_history=5)


def report_rows(report: str) -> dict[str, list[str]]:
    """The per-run table of REPORT.md: run name -> its cells."""
    rows = re.findall(r"^\| ((?:\w|[-.])+_seed-\d) \| (.*) \|$", report, flags=re.M)
    return {name: [c.strip() for c in cells.split("|")] for name, cells in rows}


def test_a_2x2_grid_over_2_seeds_trains_and_reports_every_run(tmp_path):
    grid = tiny_grid(tmp_path, {"layernorm": ["sandwich"], "softmax": ["fp32", "half"], "egs": ["1.0", "0.1"]}, seeds=2)
    trained = run_grid(grid, counting_data())
    assert [r.name for r in trained] == [r.name for r in grid.runs()] and len(trained) == 8
    for run in trained:
        result = json.loads((run_folder(run) / RESULT_FILE).read_text())
        records = read_metrics(run_folder(run) / "metrics", "train")
        assert result["steps"] == STEPS == len(records)
        # the switches reached the run: the trainer's embedding gradient scale, the model config
        assert {r["embedding_grad_scale"] for r in records} == {float(run.setting["egs"])}
        saved = (run_folder(run) / "train_config.yaml").read_text()
        assert f"attention_softmax: {run.setting['softmax']}" in saved and "layernorm_order: sandwich" in saved
        assert not (run_folder(run) / "checkpoints").exists()  # dropped once finished

    report = write_grid_report(grid, RULE).read_text()
    rows = report_rows(report)
    assert set(rows) == {r.name for r in grid.runs()}
    assert all(cells[1] == str(STEPS) and cells[-1] == "no" for cells in rows.values())
    assert (grid.out_dir / "curves.png").stat().st_size > 10_000
    # the per-setting table: one row per setting, both seeds done
    assert (
        len(
            re.findall(
                r"^\| sandwich \| (fp32|half) \| (1.0|0.1) \| 2/2 \| \d\.\d{3} ± \d\.\d{3} \|", report, flags=re.M
            )
        )
        == 4
    )
    # in an fp32 run the compute dtype is fp32: the softmax switch changes nothing, and the summary says so
    assert (
        "Runs differing only in softmax had bit-identical loss curves where layernorm=sandwich egs=1.0; "
        "layernorm=sandwich egs=0.1: the switch changes nothing there."
    ) in report
    assert "No run diverged" in report and "egs: final validation loss 1.0 " in report


class KilledSource(CountingSource):
    """Raises KeyboardInterrupt when its `calls`-th micro-batch is drawn: a kill part-way through a grid."""

    def __init__(self, calls):
        super().__init__()
        self.calls_left = calls

    def micro_batch(self, index):
        self.calls_left -= 1
        if self.calls_left == 0:
            raise KeyboardInterrupt("simulated kill")
        return super().micro_batch(index)


def test_an_interrupted_grid_resumes_without_training_finished_runs_again(tmp_path):
    grid = tiny_grid(tmp_path, {"layernorm": ["deepnorm", "pre"], "precision": ["fp32", "bf16"]})
    runs = grid.runs()
    draws = grid.base.train_samples // grid.base.micro_batch_size  # micro-batches one run draws
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, counting_data(KilledSource(calls=2 * draws + draws * 3 // 4)))  # late in the third run
    finished = {r.name: (run_folder(r) / RESULT_FILE).read_bytes() for r in runs[:2]}
    metrics = {r.name: (run_folder(r) / "metrics" / "train.jsonl").read_bytes() for r in runs[:2]}
    assert not (run_folder(runs[2]) / RESULT_FILE).exists() and (run_folder(runs[2]) / "checkpoints").is_dir()
    assert not run_folder(runs[3]).exists()

    source = CountingSource()
    trained = run_grid(grid, counting_data(source))
    assert [r.name for r in trained] == [runs[2].name, runs[3].name]
    for name in finished:  # untouched
        assert (grid.out_dir / "runs" / name / RESULT_FILE).read_bytes() == finished[name]
        assert (grid.out_dir / "runs" / name / "metrics" / "train.jsonl").read_bytes() == metrics[name]
    # the third run went on from its last checkpoint (step 5 or 10), not from its first batch
    assert source.used[0] > 0 and source.used.count(0) == 1  # index 0 drawn again by the fourth run only
    steps = {r["step"] for r in read_metrics(run_folder(runs[2]) / "metrics", "train")}
    assert steps == set(range(1, STEPS + 1))
    assert run_grid(grid, counting_data()) == []  # all finished: nothing to train
    assert set(report_rows(write_grid_report(grid, RULE).read_text())) == {r.name for r in runs}


def test_a_folder_of_another_base_config_is_refused(tmp_path):
    grid = tiny_grid(tmp_path, {"egs": ["1.0"]})
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, counting_data(KilledSource(calls=3)))
    other = tiny_grid(tmp_path, {"egs": ["1.0"]}, lr=1e-3)
    with pytest.raises(
        GLMError,
        match=r"runs/egs-1.0_seed-0 holds a run of another base config or grid "
        r"\(lr: 0.003 there, 0.001 now\); use a new --out",
    ):
        run_grid(other, counting_data())


def test_one_worker_process_per_device(tmp_path):
    grid = tiny_grid(tmp_path, {"egs": ["1.0", "0.1"]}, steps=4)
    seen = []
    run_grid(grid, counting_data(), devices=["cpu", "cpu"], on_finished=lambda run, result: seen.append(run.name))
    assert sorted(seen) == sorted(r.name for r in grid.runs())
    for run in grid.runs():
        result = json.loads((run_folder(run) / RESULT_FILE).read_text())
        assert (result["steps"], result["device"]) == (4, "cpu")


def test_torchrun_is_refused_with_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(GLMError, match="pass --devices cuda:0,cuda:1,... to train one run per GPU"):
        run_grid(tiny_grid(tmp_path, {"egs": ["1.0"]}), counting_data())
