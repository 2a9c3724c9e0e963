"""Exact match of greedy answers on held-out records, through the generation API: the before and
after figure of a fine-tune. (The evaluation toolkit's metrics, with SQuAD-style normalisation,
are glm130b.evaluate's.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glm130b.finetune.records import Record
from glm130b.generate.api import generate
from glm130b.generate.strategies import Greedy

BATCH = 16  # prompts generated together


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer, records: Sequence[Record]) -> float:
    """Percent of `records` whose greedy answer equals the target, both stripped of surrounding
    whitespace. Each answer may run one token past its target's length (room for the <eop>)."""
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(records), BATCH):
        chunk = records[start : start + BATCH]
        longest = max(len(tokenizer.encode(r.target)) for r in chunk)
        results = generate(model, tokenizer, [r.prompt for r in chunk], Greedy(), max_new_tokens=longest + 1)
        hits += sum(res.blanks[0].strip() == r.target.strip() for res, r in zip(results, chunk))
    model.train(was_training)
    return 100.0 * hits / max(1, len(records))
