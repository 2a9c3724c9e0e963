"""Helpers of the ablation tests: a tiny base run and the data every run of a test grid shares."""

from glm130b.ablation.grid import Grid, provoked
from glm130b.ablation.runner import RunData
from tests.train.helpers import LENGTH, VOCAB, CountingSource, tiny_run_config

STEPS = 12


def tiny_base(tmp_path, **overrides):
    """glm-tiny on the counting language, checkpoints every 5 steps (so a killed run resumes);
    fp32 rotary tables: CPU autocast to bf16 refuses torch.cat of fp16 ones."""
    model = dict(vocab_size=VOCAB, max_sequence_length=LENGTH, rotary_dtype="fp32")
    return tiny_run_config(tmp_path, name="base", model=model, **overrides)


def tiny_grid(tmp_path, axes, seeds=1, steps=STEPS, **overrides) -> Grid:
    return Grid(provoked(tiny_base(tmp_path, **overrides), steps), axes, seeds, tmp_path / "grid")


def counting_data(source=None) -> RunData:
    return RunData(source or CountingSource(), {"count": [CountingSource(seed=99).micro_batch(i) for i in range(2)]})
