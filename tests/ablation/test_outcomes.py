"""A run's outcome read from metrics files written here by hand, every count known in advance."""

import json
import math

from glm130b.ablation.outcomes import read_outcome
from glm130b.ablation.runner import RESULT_FILE, run_folder
from glm130b.ablation.spikes import SpikeRule
from glm130b.train.metrics import MetricsLog
from tests.ablation.helpers import tiny_grid

RULE = SpikeRule(factor=1.5, grad_factor=10.0, window=10, min_history=5)


def write_run(run, records, interventions=0, result=None):
    log = MetricsLog(run_folder(run) / "metrics", "jsonl", tensorboard=False)
    for record in records:
        log.write("train", record)
    for step in range(interventions):
        log.write("intervention", {"step": step, "reason": "test"})
    result = {
        "steps": len(records),
        "parameters": 1,
        "valid_loss": {"en": 2.0, "zh": 3.0},
        "stopped": None,
        **(result or {}),
    }
    (run_folder(run) / RESULT_FILE).write_text(json.dumps(result))


def test_outcome_counts_spikes_skips_rollbacks_and_final_losses(tmp_path):
    run = tiny_grid(tmp_path, {"precision": ["fp16"]}).runs()[0]
    assert read_outcome(run, RULE) is None  # not finished
    records = []
    for step in range(1, 41):
        loss = 4.0 if step == 20 else 2.0  # one loss spike
        norm = 30.0 if step in (25, 26) else 1.0  # one gradient-norm spike of two steps
        skipped = step in (3, 30)  # fp16 overflows: infinite norm, not a spike
        records.append(
            {"step": step, "loss": loss, "grad_norm": math.inf if skipped else norm, "skipped_update": skipped}
        )
    records[9]["loss"] = 100.0  # a spike at step 10 that the guard rolled back:
    records.append({**records[9], "loss": 2.0})  # its replay is the record that counts
    write_run(run, records, interventions=1)
    outcome = read_outcome(run, RULE)
    assert outcome.steps == list(range(1, 41))
    assert [(e.start, e.end) for e in outcome.verdict.events] == [(20, 21)]
    assert [(e.start, e.peak, e.end) for e in outcome.grad_spikes] == [(25, 25, 27)]
    assert (outcome.loss_scale_skips, outcome.interventions, outcome.divergence) == (2, 1, None)
    assert outcome.valid_loss == 2.5  # mean over the languages
    assert outcome.final_train_loss == 2.0  # the last 4 steps


def test_a_run_the_guard_gave_up_on_is_diverged(tmp_path):
    run = tiny_grid(tmp_path, {"precision": ["fp16"]}).runs()[0]
    write_run(
        run,
        [{"step": 1, "loss": 2.0, "grad_norm": 1.0}],
        result={"valid_loss": {}, "stopped": "step 9: loss 9 > 1.5 x recent median 2"},
    )
    outcome = read_outcome(run, RULE)
    assert outcome.divergence == "stopped by the spike guard: step 9: loss 9 > 1.5 x recent median 2"
    assert outcome.valid_loss is None
