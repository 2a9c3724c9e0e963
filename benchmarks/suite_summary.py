"""The one table of the GPU suite (benchmarks/gpu_suite.sh). Each benchmark records its headline
figures with `write_summary` (into $OUT/summary/<benchmark>.json); `python benchmarks/suite_summary.py
OUT` prints them all, with the suite's status of each benchmark (ok, failed, timed out)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def figure(
    name: str,
    value: float,
    unit: str,
    goal: float | None = None,
    baseline_name: str = "",
    baseline: float | None = None,
    higher_is_better: bool = True,
) -> dict:
    """One row: `value` against its goal and against a baseline measured in the same run."""
    return {
        "figure": name,
        "value": value,
        "unit": unit,
        "goal": goal,
        "baseline_name": baseline_name,
        "baseline": baseline,
        "higher_is_better": higher_is_better,
    }


def write_summary(benchmark: str, rows: list[dict]) -> None:
    """Record `rows` (from `figure`) under $OUT/summary; a no-op when OUT is unset."""
    if not os.environ.get("OUT"):
        return
    directory = Path(os.environ["OUT"], "summary")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{benchmark}.json").write_text(json.dumps(rows, indent=2))


def _number(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "%":
        return f"{100 * value:.1f} %" if value >= 1e-3 else f"{100 * value:.2g} %"
    return f"{value:,.4g}" + (f" {unit}" if unit else "")


def table(out: Path) -> str:
    """Markdown: benchmark, status, figure, value, goal, baseline (same run), ratio to the baseline."""
    status = {}
    status_file = out / "suite_status.tsv"
    if status_file.exists():
        for line in status_file.read_text().splitlines():
            name, code, seconds = line.split("\t")
            status[name] = (
                "ok" if code == "0" else "TIMED OUT" if code in ("124", "137") else f"FAILED (exit {code})",
                seconds,
            )
    lines = [
        "| benchmark | status | s | figure | value | goal | baseline (same run) | ratio |",
        "|---|---|---:|---|---:|---:|---|---:|",
    ]
    names = list(status) or sorted(p.stem for p in (out / "summary").glob("*.json"))
    for name in names:
        state, seconds = status.get(name, ("?", "-"))
        path = out / "summary" / f"{name}.json"
        rows = json.loads(path.read_text()) if path.exists() else []
        if not rows:
            lines.append(f"| {name} | {state} | {seconds} | (no figure recorded) | - | - | - | - |")
        for r in rows:
            ok = r["goal"] is None or (r["value"] >= r["goal"] if r["higher_is_better"] else r["value"] <= r["goal"])
            goal = (
                "-" if r["goal"] is None else ("≥ " if r["higher_is_better"] else "≤ ") + _number(r["goal"], r["unit"])
            )
            goal += "" if r["goal"] is None or ok else " (missed)"
            baseline = (
                f"{r['baseline_name']}: {_number(r['baseline'], r['unit'])}" if r["baseline"] is not None else "-"
            )
            ratio = f"{r['value'] / r['baseline']:.2f}x" if r["baseline"] else "-"
            lines.append(
                f"| {name} | {state} | {seconds} | {r['figure']} | {_number(r['value'], r['unit'])} | "
                f"{goal} | {baseline} | {ratio} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
