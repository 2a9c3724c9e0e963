"""Pretraining: run config, optimizer and schedules, spike guard, the trainer, metrics and report."""
