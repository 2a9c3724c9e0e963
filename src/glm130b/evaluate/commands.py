"""Command-line entry point of this package: `glm130b evaluate` (run tasks, convert benchmark data,
compare two runs). Under torchrun the items are split over the ranks (data parallel)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import InputError
from glm130b.distributed.parallelize import init_distributed
from glm130b.evaluate.config import find_task_files, load_task
from glm130b.evaluate.contamination import DEFAULT_NGRAM, contamination_reports
from glm130b.evaluate.loading import QUANTIZED, load_for_evaluation
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.results import (
    compare_runs,
    comparison_table,
    plot_groups,
    read_results,
    run_record,
    write_results,
)
from glm130b.evaluate.runner import evaluate_task
from glm130b.evaluate.suite import SUITES, convert_all, suite_task_files


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.compare:
        print(comparison_table(compare_runs(read_results(args.compare[0]), read_results(args.compare[1]))))
        return 0
    if args.convert:
        if not args.data_root:
            raise InputError("--convert needs --data-root: the folder to write the tasks' data into")
        for path in convert_all(args.convert, args.data_root):
            print(f"wrote {path}", file=sys.stderr)
        if not args.model:
            return 0
    if not args.model or not (args.tasks or args.suite) or not args.data_root:
        raise InputError(
            "give --model DIR, --data-root DIR and --tasks FILE_OR_DIR... or --suite paper "
            "(or --compare A B, or --convert SRC --data-root DIR)"
        )
    files = (find_task_files(args.tasks) if args.tasks else []) + (suite_task_files(args.suite) if args.suite else [])
    configs = [load_task(f) for f in files]
    if "RANK" in os.environ:
        init_distributed()
    model, tokenizer, info = load_for_evaluation(
        args.model, args.quantized, args.tokenizer, args.device, args.dtype, args.adapter
    )
    executor = Executor(args.batch_size, progress=not args.no_progress)
    tasks = [evaluate_task(config, args.data_root, model, tokenizer, executor, args.limit) for config in configs]
    if executor.rank != 0:
        return 0
    if args.decontaminate:
        reports = contamination_reports(configs, tasks, args.data_root, args.decontaminate, tokenizer, args.ngram)
        for task, report in zip(tasks, reports):
            task["contamination"] = report
    out = Path(args.out)
    write_results(out, run_record({**info, "world_size": executor.world}), tasks)
    for task in tasks:
        plot_groups(task, out / f"{task['name']}.png")
    print((out / "results.md").read_text())
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (config.json + model.safetensors, tokenizer/ inside)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: MODEL/tokenizer)")
    p.add_argument("--adapter", help="a LoRA or P-tuning v2 adapter folder (glm130b finetune) to load onto the model")
    p.add_argument("--quantized", choices=tuple(QUANTIZED), help="quantize the linear weights on load (weight-only)")
    p.add_argument("--tasks", nargs="+", help="task YAML files (official format) or folders of them")
    p.add_argument("--suite", choices=tuple(SUITES), help="the built-in tasks of the paper's headline numbers")
    p.add_argument("--data-root", help="folder the tasks' `path` fields are relative to")
    p.add_argument(
        "--limit", type=int, help="score about N items (lm: windows) per task: the first ceil(N / files) of each file"
    )
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: each task's micro-batch-size)")
    p.add_argument("--out", default="eval-results", help="folder for results.json, results.md and a PNG per task")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument(
        "--decontaminate",
        metavar="PREPARED_CORPUS",
        help="report n-gram overlap of each task's items with this prepared corpus, and the clean score",
    )
    p.add_argument("--ngram", type=int, default=DEFAULT_NGRAM, help="n for --decontaminate (GPT-3 used 13)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired bootstrap of two results.json files")
    p.add_argument(
        "--convert",
        metavar="SOURCE",
        help="write the suite's data from the benchmark files in SOURCE "
        "(the layout of shared/data/eval) into --data-root",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
