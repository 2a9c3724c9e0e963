"""Shared helpers of the fine-tuning tests: the toy task's run settings on the CPU."""

from glm130b.finetune.toy_task import RUN as TOY_RUN
from glm130b.finetune.toy_task import write_jsonl

RUN = {**TOY_RUN, "device": "cpu"}

__all__ = ["RUN", "write_jsonl"]
