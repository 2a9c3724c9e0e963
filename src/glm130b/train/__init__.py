"""Pretraining: the run config, optimizer and schedules, the step, model builders, data setup, the
trainer loop, run checkpoints, the spike guard, metrics and report, and `run_pretraining`."""
