"""Generation inputs from token ids (SPEC.md section 5): the prompt rule, positions, attention masks.

A generation sequence is `context + [<sop>] + generated`. The context holds mask tokens; the one
being filled is the first of the kind `generation_mask` picks, and the context sees itself
bidirectionally; `<sop>` and generated tokens see the whole context and, causally, each other.
Masks are bool with True = blocked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm130b.core.errors import InputError
from glm130b.model.masks import dense_attention_mask
from glm130b.tokenizer.specials import GLM130B_TOKENS, SpecialTokens


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [B, L] long, right-padded with pad
    position_ids: torch.Tensor  # [B, L] or [B, 2, L]
    attention_mask: torch.Tensor  # [B, 1, L, L] bool, True = blocked
    lengths: torch.Tensor  # [B] real length of each row

    def step(self, start: int, end: int) -> ModelInputs:
        """Inputs for tokens start..end-1 on top of a KV cache holding tokens 0..start-1."""
        return ModelInputs(
            self.input_ids[:, start:end],
            self.position_ids[..., start:end],
            self.attention_mask[:, :, start:end, :end],
            self.lengths,
        )


def mask_priority(tokens: SpecialTokens, two_d: bool = False) -> tuple[int, int, int]:
    """Mask kinds, the one filled first. GLM-130B's generate.py fills [MASK] if the prompt has one,
    else [sMASK], else [gMASK]; ChatGLM-6B's code (2-D positions) takes [gMASK] before [MASK]."""
    return (tokens.gmask, tokens.mask, tokens.smask) if two_d else (tokens.mask, tokens.smask, tokens.gmask)


def generation_mask(context: list[int], tokens: SpecialTokens, two_d: bool = False) -> int | None:
    """The mask token a generation pass fills (by `mask_priority`), None when the context has none.
    Masks of the other kinds stay in the context as ordinary tokens."""
    return next((kind for kind in mask_priority(tokens, two_d) if kind in context), None)


def mask_position(context: list[int], tokens: SpecialTokens, two_d: bool = False) -> tuple[int, bool]:
    """Index of the first mask of the kind being filled, and whether that kind is [gMASK]."""
    kind = generation_mask(context, tokens, two_d)
    if kind is None:
        raise InputError(
            "context has no [MASK], [sMASK] or [gMASK] token: add [MASK] where a blank is "
            "to be filled, or end the text with [gMASK] to continue it"
        )
    return context.index(kind), kind == tokens.gmask


def generation_context(
    context: list[int], tokens: SpecialTokens = GLM130B_TOKENS, default_mask: int | None = None
) -> list[int]:
    """The official prompt rule on ids: with no mask token, append `default_mask` (or refuse when
    None); a context that does not end with a mask token gets eos; then <sop>. (On text the official
    rule decides eos by the text itself: glm130b.generate.prompts.parse_prompt.)"""
    context = list(context)
    if not any(t in tokens.mask_ids for t in context):
        if default_mask is None:
            mask_position(context, tokens)  # raises the explanatory error
        context.append(default_mask)
    if context[-1] not in tokens.mask_ids:
        context.append(tokens.eos)
    return context + [tokens.sop]


def sequence_positions(sequence: list[int], tokens: SpecialTokens, two_d: bool) -> torch.Tensor:
    """Position ids of one `context + <sop> + generated` sequence: [n] (1-D) or [2, n] (2-D)."""
    if tokens.sop not in sequence:
        raise InputError(
            "sequence has no <sop>: build it as context + [<sop>] + generated tokens (generation_context appends <sop>)"
        )
    sop = sequence.index(tokens.sop)
    mpos, is_gmask = mask_position(sequence[:sop], tokens, two_d)
    n = len(sequence)
    pos = torch.arange(n)
    if two_d:  # ChatGLM-6B: generated tokens all sit at the mask; row 1 counts within the span
        pos[sop:] = mpos
        block = torch.zeros(n, dtype=torch.long)
        block[sop:] = torch.arange(1, n - sop + 1)
        return torch.stack([pos, block])
    if not is_gmask:  # [MASK]/[sMASK]: the span takes its mask's position; [gMASK] keeps counting
        pos[sop:] = mpos
    return pos


def prefix_lm_mask(prefix_lengths: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Bool [B, 1, L, L], True = blocked: keys < prefix are visible to all rows, later keys causally,
    pad keys (>= length) blocked; a pad row sees only itself (see glm130b.model.masks)."""
    idx = torch.arange(total).unsqueeze(0)  # [1, L]
    segment_ids = (idx < lengths.unsqueeze(1)).long()  # one segment per row, 0 = pad
    return dense_attention_mask(segment_ids, idx < prefix_lengths.unsqueeze(1))


def build_generation_batch(
    sequences: list[list[int]],
    tokens: SpecialTokens = GLM130B_TOKENS,
    position_encoding: str = "1d",
    max_sequence_length: int | None = None,
    vocab_size: int | None = None,
) -> ModelInputs:
    """Right-padded ids, positions and masks for sequences `context + <sop> + generated`."""
    if not sequences:
        raise InputError("no sequences given")
    two_d = position_encoding == "2d"
    total = max(len(s) for s in sequences)
    # Positions never exceed the length - 1, so checking the length bounds them too.
    if max_sequence_length is not None and total > max_sequence_length:
        longest = max(range(len(sequences)), key=lambda b: len(sequences[b]))
        raise InputError(
            f"sequence {longest} has {total} tokens, more than max_sequence_length "
            f"{max_sequence_length}; shorten the context or generate fewer tokens"
        )
    ids = torch.full((len(sequences), total), tokens.pad, dtype=torch.long)
    pos = torch.zeros((len(sequences), 2, total) if two_d else (len(sequences), total), dtype=torch.long)
    prefix = torch.empty(len(sequences), dtype=torch.long)
    for b, seq in enumerate(sequences):
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in seq):
            bad = next(t for t in seq if not 0 <= t < vocab_size)
            raise InputError(f"sequence {b}: token id {bad} is outside the vocabulary [0, {vocab_size})")
        ids[b, : len(seq)] = torch.tensor(seq)
        pos[b, ..., : len(seq)] = sequence_positions(seq, tokens, two_d)
        prefix[b] = seq.index(tokens.sop)
    lengths = torch.tensor([len(s) for s in sequences])
    return ModelInputs(ids, pos, prefix_lm_mask(prefix, lengths, total), lengths)
