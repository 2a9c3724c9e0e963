"""Results files: the JSON record of a run (scores, intervals, per-item records and what is needed
to reproduce it), its Markdown table, a PNG bar chart per task over its groups with the 95 %
intervals, and the paired comparison of two runs (SPEC.md section 9; docs/evaluation.md).
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import glm130b
from glm130b.core.atomic import atomic_write_text
from glm130b.core.errors import GLMError
from glm130b.evaluate.scores import UnitScores
from glm130b.evaluate.significance import paired_bootstrap
from glm130b.train.report import markdown_table, save_png

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"


def source_commit() -> dict:
    """The git commit of the package's source tree (None outside a checkout) and whether it has
    uncommitted changes."""
    where = Path(glm130b.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(where), "status", "--porcelain", "--", "."],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def run_record(model_info: dict) -> dict:
    """What produced the results besides the tasks: model, quantization, package version and commit."""
    return {
        "model": model_info,
        "package": {"name": "glm130b", "version": glm130b.__version__, **source_commit()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(out_dir: str | Path, run: dict, tasks: list[dict]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    atomic_write_text(path, json.dumps({"run": run, "tasks": tasks}, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / TABLE_FILE, markdown_report(run, tasks))
    return path


def read_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GLMError(f"no results at {path}; give a results.json written by `glm130b evaluate`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GLMError(
            f"{path} is not a results file ({err}); give a results.json written by `glm130b evaluate`"
        ) from None
    if not isinstance(data, dict) or "tasks" not in data:
        raise GLMError(f"{path} is not a results file (no `tasks`); give a results.json written by `glm130b evaluate`")
    return data


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def _interval(entry: dict) -> str:
    low, high = entry["interval"]
    return f"{_fmt(entry['value'])} [{_fmt(low)}, {_fmt(high)}]"


def markdown_report(run: dict, tasks: list[dict]) -> str:
    model = run["model"]
    package = run["package"]
    lines = [
        "# Evaluation results",
        "",
        f"Model `{model.get('path')}` ({model.get('quantization') or 'not quantized'}, {model.get('dtype')}), "
        f"glm130b {package['version']} at commit {package['commit'] or 'unknown'}"
        f"{' (uncommitted changes)' if package.get('dirty') else ''}, {run['created']}.",
        "",
        "Scores with 95 % bootstrap intervals; groups: item-weighted mean (median, max) over their files; "
        "categories (Pile subsets, bias types): pooled over the files.",
        "",
    ]
    rows = []
    for task in tasks:
        for metric, entry in task["metrics"].items():
            rows.append(
                [task["name"], "all", metric, _interval(entry), sum(f["units"] for f in task["files"].values())]
            )
        report = task.get("contamination")
        if report and report["clean"]:
            for metric, entry in report["clean"].items():
                rows.append(
                    [
                        task["name"],
                        f"clean ({report['contaminated']} of {report['units']} contaminated, {report['ngram']}-grams)",
                        metric,
                        _interval(entry),
                        report["units"] - report["contaminated"],
                    ]
                )
        if len(task["groups"]) > 1:
            for group, g in task["groups"].items():
                for metric, stats in g["statistics"].items():
                    rows.append(
                        [
                            task["name"],
                            group,
                            metric,
                            f"{_interval(g['pooled'][metric])} "
                            f"(median {_fmt(stats['median'])}, max {_fmt(stats['max'])})",
                            sum(task["files"][f]["units"] for f in g["files"]),
                        ]
                    )
        for category, entry in task.get("breakdown", {}).items():  # Pile subsets, bias types
            for metric, pooled in entry["pooled"].items():
                rows.append([task["name"], category, metric, _interval(pooled), entry["units"]])
    lines.append(markdown_table(["task", "group", "metric", "score", "items"], rows))
    return "\n".join(lines) + "\n"


def plot_groups(task: dict, png_path: str | Path) -> Path | None:
    """Bars of each group's pooled score per metric with its interval; None without matplotlib."""
    try:
        import matplotlib  # optional (the `eval` extra): charts are skipped without it

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = list(task["metrics"])
    groups = list(task["groups"])
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(max(4, 1.2 * len(groups)) * len(metrics), 3.5), dpi=110, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics):
        pooled = [task["groups"][g]["pooled"][metric] for g in groups]
        values = [p["value"] for p in pooled]
        errors = [
            [v - p["interval"][0] for v, p in zip(values, pooled)],
            [p["interval"][1] - v for v, p in zip(values, pooled)],
        ]
        ax.bar(groups, values, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_title(f"{task['name']}: {metric}")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    return save_png(figure, png_path)


def compare_runs(a: dict, b: dict) -> list[dict]:
    """Per task present in both runs and per metric: B - A with a paired bootstrap interval and
    p-value over the same units. Runs that scored different data cannot be paired."""
    tasks_b = {t["name"]: t for t in b["tasks"]}
    out = []
    for task_a in a["tasks"]:
        task_b = tasks_b.get(task_a["name"])
        if task_b is None:
            continue
        files_a, files_b = task_a["files"], task_b["files"]
        for name in files_a:
            if (
                name not in files_b
                or files_a[name]["sha256"] != files_b[name]["sha256"]
                or files_a[name]["units"] != files_b[name]["units"]
            ):
                raise GLMError(
                    f"task {task_a['name']}: the two runs scored different data in {name} (file, sha256 "
                    "or item count differ); compare runs over the same files and --limit"
                )
        for metric in task_a["metrics"]:
            if metric not in task_b["metrics"]:
                continue
            pooled = [
                UnitScores.pooled([UnitScores.from_dict(run[n]["scores"][metric]) for n in files_a])
                for run in (files_a, files_b)
            ]
            out.append(
                {
                    "task": task_a["name"],
                    "metric": metric,
                    "a": pooled[0].value(),
                    "b": pooled[1].value(),
                    **paired_bootstrap(*pooled),
                }
            )
    return out


def comparison_table(rows: list[dict]) -> str:
    return markdown_table(
        ["task", "metric", "A", "B", "B - A [95 %]", "p"],
        [
            [
                r["task"],
                r["metric"],
                _fmt(r["a"]),
                _fmt(r["b"]),
                f"{r['difference']:+.2f} [{r['interval'][0]:+.2f}, {r['interval'][1]:+.2f}]",
                f"{r['p_value']:.3f}",
            ]
            for r in rows
        ],
    )
