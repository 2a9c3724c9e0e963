"""Evaluation: official task configs, multiple choice, generation and lm scoring, metrics with
bootstrap intervals, built-in paper tasks, contamination, an lm-evaluation-harness adapter."""
