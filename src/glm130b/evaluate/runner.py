"""One task end to end: its files by group, each file scored by its protocol's or type's evaluator,
metrics per file, the official group statistics (max, median, item-weighted mean), the pooled score
with a bootstrap interval, per category scores where the protocol has categories, and what is
needed to reproduce it (SPEC.md section 9).
"""

from __future__ import annotations

import math
from pathlib import Path

from glm130b.evaluate import bias, generation, language_model, multiple_choice
from glm130b.evaluate.config import TaskConfig
from glm130b.evaluate.items import TaskFile, read_task_file
from glm130b.evaluate.metrics import group_statistics
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.scores import FileOutcome, UnitScores
from glm130b.evaluate.significance import bootstrap_interval

EVALUATORS = {"mul": multiple_choice.evaluate_file, "gen": generation.evaluate_file}
PROTOCOL_EVALUATORS = {
    "pile": language_model.evaluate_documents,
    "crows_pair": bias.evaluate_crows_pairs,
    "stereoset": bias.evaluate_stereoset,
}
# The official MMLU task adds one group over every subject's file (questions pooled).
OVERALL_GROUP = "Overall"


def score_file(
    task_file: TaskFile, config: TaskConfig, model, tokenizer, executor: Executor, quota: int | None = None
) -> FileOutcome:
    if config.protocol in PROTOCOL_EVALUATORS:
        return PROTOCOL_EVALUATORS[config.protocol](task_file, config, model, tokenizer, executor)
    if config.type == "lm":
        return language_model.evaluate_file(task_file, config, model, tokenizer, executor, max_windows=quota)
    return EVALUATORS[config.type](task_file, config, model, tokenizer, executor)


def summarize(scores: list[dict[str, UnitScores]], metrics: list[str]) -> dict:
    """Pooled value and 95 % bootstrap interval of each metric over the units of several files."""
    out = {}
    for metric in metrics:
        pooled = UnitScores.pooled([s[metric] for s in scores])
        out[metric] = {"value": pooled.value(), "interval": list(bootstrap_interval(pooled))}
    return out


def pooled_breakdown(outcomes: list[FileOutcome]) -> dict:
    """Each category of the files' breakdowns (Pile subsets, bias types) pooled over the files: its
    unit count and metrics with intervals."""
    out = {}
    for category in sorted({c for o in outcomes for c in o.breakdown}):
        parts = [o.breakdown[category] for o in outcomes if category in o.breakdown]
        units = sum(len(next(iter(p.values())).num) for p in parts)
        out[category] = {"units": units, "pooled": summarize(parts, list(parts[0]))}
    return out


def evaluate_task(
    config: TaskConfig, data_root: str | Path, model, tokenizer, executor: Executor, limit: int | None = None
) -> dict:
    """The result of one task as a JSON-ready dict. `limit`: about that many items (lm: windows, the
    Pile: documents), the first ceil(limit / files) of each file."""
    groups = config.file_groups(data_root)
    base = Path(data_root) / config.path
    all_files = sorted({f for files in groups.values() for f in files})
    quota = None if limit is None else max(1, math.ceil(limit / len(all_files)))
    outcomes, files = {}, {}
    for path in all_files:
        task_file = read_task_file(path, config.type, tokenizer, quota, config.protocol)
        outcome = score_file(task_file, config, model, tokenizer, executor, quota)
        name = path.relative_to(base).as_posix()
        outcomes[name] = outcome
        few_shot = sorted({i for r in outcome.records for i in r.get("few_shot_ids", [])}, key=str)
        files[name] = {
            "sha256": task_file.sha256,
            "units": len(outcome.records),
            "metrics": {m: s.value() for m, s in outcome.scores.items()},
            "few_shot_ids": few_shot,
            "records": outcome.records,
            "scores": {m: s.to_dict() for m, s in outcome.scores.items()},
        }
        if outcome.breakdown:
            files[name]["breakdown"] = {c: summarize([s], list(s)) for c, s in outcome.breakdown.items()}
    metrics = config.score_names
    group_sets = {g: [f.relative_to(base).as_posix() for f in fs] for g, fs in groups.items()}
    if config.protocol == "mmlu":
        group_sets[OVERALL_GROUP] = sorted(files)
    group_results = {}
    for group, names in group_sets.items():
        weights = [files[n]["units"] for n in names]
        group_results[group] = {
            "files": names,
            "statistics": {m: group_statistics([files[n]["metrics"][m] for n in names], weights) for m in metrics},
            "pooled": summarize([outcomes[n].scores for n in names], metrics),
        }
    breakdown = pooled_breakdown(list(outcomes.values()))
    return {
        "name": config.name,
        "type": config.type,
        "protocol": config.protocol,
        "config": dict(vars(config)),
        "prompt_template": config.prompt_template,
        "limit": limit,
        "context_length": min(config.max_seq_length, model.config.max_sequence_length),
        "metrics": summarize([o.scores for o in outcomes.values()], metrics),
        "groups": group_results,
        **({"breakdown": breakdown} if breakdown else {}),
        "files": files,
    }
