"""Task configs in the official GLM-130B YAML format (SPEC.md section 9), read unchanged.

Every field of the official `evaluation/configs.py` is accepted in both spellings (`file-pattern`
and `file_pattern`); a few fields of ours follow them. `module` names the official task class; the
built-in protocols it maps to are in MODULES. Field meanings: docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path

from glm130b.core.config_io import check_field, check_positive_int, read_mapping
from glm130b.core.errors import ConfigError

TASK_TYPES = ("mul", "gen", "lm")
DEFAULT_METRICS = {"mul": ["Accuracy"], "gen": ["EM", "F1"], "lm": ["PPL"]}
# mul: Precision, Recall and F1_mul are micro-averaged over the classes (the official sklearn calls).
KNOWN_METRICS = {
    "mul": ("Accuracy", "Precision", "Recall", "F1_mul"),
    "gen": ("EM", "F1", "Accuracy"),
    "lm": ("PPL", "BPB"),
}
# The official task classes a config may name in `module`, and the protocol each one runs. Our own
# protocols may be named directly.
MODULES = {
    "evaluation.MultiChoiceTask": None,
    "evaluation.GenerationTask": None,
    "evaluation.LanguageModelTask": None,
    "tasks.lambada.task.LAMBADA": "lambada",
    "tasks.mmlu.task.MMLU": "mmlu",
    "tasks.language-modeling.pile.Pile": "pile",
    "tasks.ethnic.crows-pair.tasks.CrowsPairTask": "crows_pair",
    "tasks.ethnic.stereoset.tasks.StereoSetTask": "stereoset",
    "lambada": "lambada",
    "mmlu": "mmlu",
    "lambada_loglikelihood": "lambada_loglikelihood",
}
# The task type each protocol scores.
PROTOCOL_TYPES = {
    "lambada": "gen",
    "lambada_loglikelihood": "gen",
    "mmlu": "mul",
    "pile": "lm",
    "crows_pair": "mul",
    "stereoset": "mul",
}
# Protocols that report their own metrics only (the official classes override `metrics`).
PROTOCOL_METRICS = {"pile": ("BPB",), "crows_pair": ("CP",), "stereoset": ("SS_ICAT",)}
# A metric that reports several scores: StereoSet's is the language model score, the stereotype
# score and their combination ICAT.
METRIC_SCORES = {"SS_ICAT": ("LMS", "SS", "ICAT")}
SAMPLING_STRATEGIES = ("BaseStrategy", "BeamSearchStrategy")
# Multiple-choice scores: summed log-probs (the official rule), per token, per UTF-8 byte of the
# choice text (lm-evaluation-harness's acc_norm), or minus the choice's log-prob after an empty context.
SCORINGS = ("sum", "token_mean", "byte_mean", "calibrated")
# The scoring a protocol uses unless the config names one: StereoSet's class ranks choices by token mean.
PROTOCOL_SCORINGS = {"stereoset": "token_mean"}


@dataclass
class TaskConfig:
    name: str
    type: str
    path: str  # under the data root
    module: str | None = None  # an official task class (see MODULES)
    metrics: list[str] = field(default_factory=list)  # empty: the type's defaults
    use_task_mask: bool = False  # [gMASK] instead of [MASK]
    use_multitask_encoding: bool = False  # mul with [MASK]: choice tokens count on from the mask
    unidirectional: bool = False  # causal context (needs [gMASK])
    max_seq_length: int = 2048  # prompts are cut on the left to fit
    file_pattern: str | dict[str, str] = "**/*.json*"  # a glob, or group name -> glob
    micro_batch_size: int = 1
    # gen
    sampling_strategy: str = "BaseStrategy"  # greedy (the official BaseStrategy with top_k=1)
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_gen_length: int = 0
    max_gen_length: int = 128
    # lm: window stride (256 in the official configs, 1024 for the Pile)
    generation_length: int = 256
    # ours
    scoring: str | None = None  # None: the protocol's (PROTOCOL_SCORINGS), else sum
    prompt_template: str | None = None  # how the data's prompts were built, recorded in results
    source: str = ""  # the YAML file this came from

    def __post_init__(self):
        if self.scoring is None:
            self.scoring = PROTOCOL_SCORINGS.get(MODULES.get(self.module), "sum")

    @property
    def protocol(self) -> str | None:
        return MODULES[self.module] if self.module else None

    @property
    def metric_names(self) -> list[str]:
        if self.metrics:
            return list(self.metrics)
        if self.protocol in PROTOCOL_METRICS:
            return list(PROTOCOL_METRICS[self.protocol])
        return ["Accuracy"] if self.protocol in ("lambada", "lambada_loglikelihood") else DEFAULT_METRICS[self.type]

    @property
    def score_names(self) -> list[str]:
        """The scores the metrics report, in the results (SS_ICAT: LMS, SS and ICAT)."""
        return [score for metric in self.metric_names for score in METRIC_SCORES.get(metric, (metric,))]

    def validate(self) -> None:
        where = self.source or self.name
        if self.type not in TASK_TYPES:
            raise ConfigError(f"{where}: unknown task type {self.type!r}; use one of {', '.join(TASK_TYPES)}")
        if self.module is not None and self.module not in MODULES:
            raise ConfigError(
                f"{where}: module {self.module!r} is not built in; use one of "
                f"{', '.join(m for m in MODULES)} or remove the field"
            )
        if self.protocol is not None and self.type != PROTOCOL_TYPES[self.protocol]:
            raise ConfigError(
                f"{where}: module {self.module} is a {PROTOCOL_TYPES[self.protocol]} task; set type to it"
            )
        allowed = PROTOCOL_METRICS.get(self.protocol, KNOWN_METRICS[self.type])
        for metric in self.metric_names:
            if metric not in allowed:
                owner = f"module {self.module}" if self.protocol in PROTOCOL_METRICS else f"type {self.type}"
                raise ConfigError(f"{where}: metric {metric!r} is not defined for {owner}; use {', '.join(allowed)}")
        if self.unidirectional and not self.use_task_mask:
            raise ConfigError(f"{where}: unidirectional needs use_task_mask: true ([MASK] has no causal form)")
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise ConfigError(
                f"{where}: sampling_strategy {self.sampling_strategy!r}; use {' or '.join(SAMPLING_STRATEGIES)}"
            )
        if self.scoring not in SCORINGS:
            raise ConfigError(f"{where}: scoring {self.scoring!r}; use one of {', '.join(SCORINGS)}")
        for name in ("max_seq_length", "micro_batch_size", "num_beams", "max_gen_length", "generation_length"):
            check_positive_int(name, getattr(self, name))
        for name in ("no_repeat_ngram_size", "min_gen_length"):
            check_field(name, getattr(self, name), int, lambda v: v >= 0, "an integer >= 0")
        check_field("length_penalty", self.length_penalty, float)
        if self.type == "lm" and self.generation_length >= self.max_seq_length - 1:
            raise ConfigError(
                f"{where}: generation_length {self.generation_length} must be below max_seq_length - 1 "
                f"({self.max_seq_length - 1}): each window needs a prompt"
            )
        if not isinstance(self.file_pattern, (str, dict)):
            raise ConfigError(f"{where}: file-pattern must be a glob or a mapping of group name to glob")

    def file_groups(self, data_root: str | Path) -> dict[str, list[Path]]:
        """Group name -> the data files its glob matches under data_root/path, sorted. A group that
        matches nothing is an error (a missing or misplaced data file)."""
        base = Path(data_root) / self.path
        patterns = {"all": self.file_pattern} if isinstance(self.file_pattern, str) else dict(self.file_pattern)
        groups = {}
        for group, pattern in patterns.items():
            files = sorted(Path(p) for p in glob.glob(str(base / pattern), recursive=True) if Path(p).is_file())
            if not files:
                raise ConfigError(
                    f"{self.source or self.name}: no data file under {base} matches {pattern!r} "
                    f"(group {group}); check --data-root and `path`, or write the data with "
                    "`glm130b evaluate convert`"
                )
            groups[group] = files
        return groups


FIELDS = {f.name for f in dataclasses.fields(TaskConfig)} - {"source"}


def task_from_mapping(data: dict, source: str) -> TaskConfig:
    """A TaskConfig from the fields of one YAML file; dashes in names read as underscores."""
    fields = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{source}: unknown field {key!r}; known fields: {', '.join(sorted(FIELDS))}")
        if name in fields:
            raise ConfigError(f"{source}: field {name} is given twice (as {key!r} and in the other spelling)")
        fields[name] = value
    missing = [name for name in ("name", "type", "path") if name not in fields]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
    config = TaskConfig(**fields, source=source)
    config.validate()
    return config


def load_task(path: str | Path) -> TaskConfig:
    return task_from_mapping(read_mapping(path, "task config"), str(path))


def find_task_files(paths: list[str | Path]) -> list[Path]:
    """YAML files named directly, and every *.yaml below each folder named (the official rule)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob("*.yaml"))
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"task config {path} does not exist; give a YAML file or a folder of them")
    if not found:
        raise ConfigError(f"no task YAML file in {', '.join(map(str, paths))}")
    return found
