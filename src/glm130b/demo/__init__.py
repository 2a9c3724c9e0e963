"""`glm130b demo`: corpus, tokenizer, a small GLM trained with the GLM-130B recipe, and a report
that shows it learned (glm130b.demo.pipeline, with baselines, infilling and report beside it)."""

from glm130b.demo.pipeline import add_demo_arguments, cmd_demo, run_demo

__all__ = ["add_demo_arguments", "cmd_demo", "run_demo"]
