"""Scored sequences (SPEC.md sections 5 and 9): a context read once, then causal blocks that each
see the context and themselves but no other block, and the log-probs of their target tokens.

A multiple-choice item packs every choice as its own block after `context + [M]`: a 4-way
question costs one forward, not four. A language-model window is the same shape with one block.
`score_sequences` runs any list of them in padded batches and returns, per target span, the
summed log-prob, the token count and whether every token was the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glm130b.core.errors import InputError
from glm130b.tokenizer.specials import SpecialTokens


@dataclass
class ScoredSequence:
    tokens: list[int]
    positions: list[int]
    division: int  # columns [0, division) are the context every row sees
    causal_context: bool = False  # True: context rows see only earlier context (unidirectional)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (first row, length) of each causal block
    spans: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (rows, target ids) per scored span


@dataclass
class SpanScore:
    log_prob: float  # summed over the span's tokens
    tokens: int
    greedy: bool  # every target token was the most likely one


def pack_choices(
    context: list[int],
    choices: list[list[int]],
    specials: SpecialTokens,
    *,
    gmask: bool,
    single_token: bool,
    multitask_encoding: bool = False,
    causal_context: bool = False,
) -> ScoredSequence:
    """`context + [M] + ([sop] + c[:-1]) for c in choices`, targets `c`; with `single_token` one
    [sop] whose row gives every choice's log-prob. A mask written in the context (blank filling)
    is used where it is instead of appending one. Positions: [MASK] puts every choice token at the
    mask; [gMASK] (or multitask encoding) counts each block on from the mask."""
    mask_id = specials.gmask if gmask else specials.mask
    tokens = list(context)
    if mask_id in context:
        mask_at, blank_filling = context.index(mask_id), True
    else:
        mask_at, blank_filling = len(tokens), False
        tokens.append(mask_id)
    positions = list(range(len(tokens)))  # the appended mask sits at its own index
    division = len(tokens)
    seq = ScoredSequence(tokens, positions, division, causal_context)
    for choice in choices:
        start = len(tokens)
        length = 1 if single_token else len(choice)
        if gmask:
            positions += range(division, division + length)
        elif multitask_encoding and not blank_filling:
            positions += range(mask_at, mask_at + length)
        else:
            positions += [mask_at] * length
        tokens += [specials.sop] + choice[: length - 1]
        seq.blocks.append((start, length))
        if single_token:
            seq.spans = [([start], [c[0]]) for c in choices]
            break
        seq.spans.append((list(range(start, start + length)), list(choice)))
    return seq


def pack_window(
    prompt: list[int], text: list[int], specials: SpecialTokens, *, gmask: bool = True, causal_context: bool = False
) -> ScoredSequence:
    """An lm window: `prompt + [M, sop] + text[:-1]`, targets `text`, positions arange; the prompt
    and the mask token form the context, the scored text is one causal block."""
    mask_id = specials.gmask if gmask else specials.mask
    tokens = prompt + [mask_id, specials.sop] + text[:-1]
    division = len(prompt) + 1
    rows = list(range(division, division + len(text)))
    return ScoredSequence(
        tokens, list(range(len(tokens))), division, causal_context, [(division, len(text))], [(rows, list(text))]
    )


def attention_masks(sequences: list[ScoredSequence], total: int) -> torch.Tensor:
    """Bool [B, 1, L, L], True = blocked. Each token is labelled 0 (context), k (block k) or -1 (pad);
    a row sees the context (causally if `causal_context`) and, causally, its own block. A pad row
    sees only itself (see glm130b.model.masks)."""
    label = torch.full((len(sequences), total), -1, dtype=torch.long)
    causal_context = torch.tensor([s.causal_context for s in sequences]).view(-1, 1, 1)
    for b, seq in enumerate(sequences):
        label[b, : seq.division] = 0
        for k, (start, length) in enumerate(seq.blocks, 1):
            label[b, start : start + length] = k
    idx = torch.arange(total)
    earlier = idx.view(1, total) <= idx.view(total, 1)  # [L, L]: key j <= query i
    query, key = label.unsqueeze(2), label.unsqueeze(1)  # [B, L, 1], [B, 1, L]
    sees_context = (key == 0) & (query >= 0) & (earlier | (query > 0) | ~causal_context)
    sees_own_block = (key > 0) & (query == key) & earlier
    pad_self = (query < 0) & torch.eye(total, dtype=torch.bool)
    return ~(sees_context | sees_own_block | pad_self).unsqueeze(1)


@torch.no_grad()
def score_batch(model, sequences: list[ScoredSequence], pad_id: int) -> list[list[SpanScore]]:
    """One forward over right-padded sequences; the score of every span of every sequence."""
    cfg = model.config
    total = max(len(s.tokens) for s in sequences)
    if total > cfg.max_sequence_length:
        raise InputError(
            f"a scored sequence has {total} tokens, more than the model's context of "
            f"{cfg.max_sequence_length}; lower the task's max_seq_length or shorten the choices"
        )
    device = model.transformer.word_embeddings.weight.device
    ids = torch.full((len(sequences), total), pad_id, dtype=torch.long)
    pos = torch.zeros(len(sequences), total, dtype=torch.long)
    rows, targets, owners = [], [], []
    for b, seq in enumerate(sequences):
        ids[b, : len(seq.tokens)] = torch.tensor(seq.tokens)
        pos[b, : len(seq.positions)] = torch.tensor(seq.positions)
        for s, (span_rows, span_targets) in enumerate(seq.spans):
            rows += [(b, r) for r in span_rows]
            targets += span_targets
            owners += [(b, s)] * len(span_rows)
    if cfg.position_encoding == "2d":
        raise InputError("evaluation scores 1-D position models (GLM-130B); this model uses 2-D positions")
    # Only the scored rows go through the output layer: with a real vocabulary (150,528 for GLM-130B)
    # it costs more than the rest of a small model's forward at every position.
    where = torch.tensor([b * total + r for b, r in rows], device=device)  # into the flattened [B * L]
    masks = attention_masks(sequences, total).to(device)
    picked = model(ids.to(device), pos.to(device), masks, logits_where=where).float()  # [N, V]
    log_probs = torch.log_softmax(picked, dim=-1)
    target = torch.tensor(targets, device=device)
    token_lp = log_probs.gather(1, target.unsqueeze(1)).squeeze(1).tolist()
    greedy = (picked.argmax(dim=-1) == target).tolist()
    out = [[SpanScore(0.0, 0, True) for _ in seq.spans] for seq in sequences]
    for (b, s), lp, g in zip(owners, token_lp, greedy):
        span = out[b][s]
        span.log_prob += lp
        span.tokens += 1
        span.greedy &= g
    return out
