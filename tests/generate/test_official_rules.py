"""The prompt and blank-filling rules of GLM-130B's generate.py (`fill_blanks`), written out here
independently, against the text API (parse_prompt, generate, stream_text) and the token-id API
(fill_blanks): which mask kind is filled, where eos goes, the positions of each pass."""

import re

import pytest
import torch

from glm130b.generate.api import generate, stream_text
from glm130b.generate.decode import end_tokens, fill_blanks
from glm130b.generate.prompts import parse_prompt
from glm130b.generate.strategies import Greedy
from tests.generate.helpers import TOK, CharTokenizer, PositionStub

OFFICIAL_PATTERN = r"\[[sg]?MASK\]"
MARKER_IDS = {"[MASK]": TOK.mask, "[sMASK]": TOK.smask, "[gMASK]": TOK.gmask}


def official_prompt(text: str, tokenizer) -> tuple[str, bool, list[int]]:
    """generate.py, before generation: (the mask kind filled, use_gmask, the context ids)."""
    generation_mask = "[gMASK]"
    if "[MASK]" in text:
        generation_mask = "[MASK]"
    elif "[sMASK]" in text:
        generation_mask = "[sMASK]"
    use_gmask = "[MASK]" not in text and "[sMASK]" not in text
    pieces, markers = re.split(OFFICIAL_PATTERN, text), re.findall(OFFICIAL_PATTERN, text)
    seq = []
    for piece, marker in zip(pieces, markers):
        seq += tokenizer.encode(piece) + [MARKER_IDS[marker]]
    seq += tokenizer.encode(pieces[-1])
    if "MASK]" not in text:
        seq.append(MARKER_IDS[generation_mask])
        text += " " + generation_mask
    if not text.endswith("MASK]"):
        seq.append(TOK.eos)
    return generation_mask, use_gmask, seq


def official_fill(model, seq: list[int], mask_token: int, use_gmask: bool, max_new_tokens: int):
    """generate.py's loop: while the kind's token is in the sequence, generate after <sop> with
    every step recomputed from scratch (its get_masks_and_position_ids: columns before <sop> seen by
    all, the rest causal; positions arange, or the mask position from <sop> on unless use_gmask),
    then put the span (end token dropped) in place of that mask. Greedy."""
    ends = end_tokens(TOK)
    blanks = []
    while mask_token in seq:
        mask_position = seq.index(mask_token)
        tokens = seq + [TOK.sop]
        context_length = len(tokens)
        while len(tokens) < context_length + max_new_tokens:
            n = len(tokens)
            positions = torch.arange(n)
            if not use_gmask:
                positions[context_length - 1 :] = mask_position
            visible = torch.ones(n, n).tril()
            visible[:, : context_length - 1] = 1
            with torch.no_grad():
                logits = model(torch.tensor([tokens]), positions[None], (visible < 0.5)[None, None])
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] in ends:
                break
        span = tokens[context_length:]
        if span and span[-1] in ends:
            span = span[:-1]
        blanks.append(span)
        seq = seq[:mask_position] + span + seq[mask_position + 1 :]
    return seq, blanks


TEXTS = [
    "abc",  # no marker: [gMASK] appended, no eos
    "ab[gMASK]",  # ends with its mask: no eos
    "a[MASK]bc",  # right context: eos
    "[MASK]a[MASK]",
    "ab[MASK] ",  # a trailing space: eos (the text does not end with "MASK]"), no id for it
    "ab[MASK]\n",
    "ab[gMASK] ",
    "a[gMASK]b[MASK]c",  # [MASK] is filled, the [gMASK] stays
    "ab[MASK]c[gMASK]",  # ends with [gMASK]: no eos; [MASK] filled
    "a[sMASK]b[gMASK]c",  # [sMASK] before [gMASK]
    "a[gMASK]b[sMASK]c[MASK]d",  # [MASK] before both
    "a[gMASK]b[gMASK]",  # two [gMASK]: both filled, left to right
    "ab[mask]c",  # not a marker: plain text, [gMASK] appended
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # [sMASK] and [mask] are warned about
@pytest.mark.parametrize("text", TEXTS)
def test_prompt_context_and_kind_follow_the_official_rule(text):
    tok = CharTokenizer()
    kind, _, context = official_prompt(text, tok)
    prompt = parse_prompt(text, tok)
    assert prompt.context == context
    assert prompt.blank == kind


def test_trailing_space_gets_eos_on_text_but_ids_alone_cannot_tell():
    """The official rule decides eos on the text: a trailing space encodes to no id, so the ids of
    "ab[MASK] " end with the mask, yet the text gets eos."""
    tok = CharTokenizer()
    assert tok.encode_prompt("ab[MASK] ") == tok.encode_prompt("ab[MASK]")
    assert parse_prompt("ab[MASK] ", tok).context[-1] == TOK.eos
    assert parse_prompt("ab[MASK]", tok).context[-1] == TOK.mask


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("text", TEXTS)
def test_blanks_filled_as_the_official_loop_fills_them(text, trained):
    """Text API and token-id API against the official loop, on the position-rule stub (whose
    answers spell the positions they were generated at) and on the trained tiny model."""
    tok = CharTokenizer()
    kind, use_gmask, context = official_prompt(text, tok)
    for model in (PositionStub(), trained):
        expected_seq, expected_blanks = official_fill(model, context, MARKER_IDS[kind], use_gmask, 5)
        result = generate(model, tok, text, Greedy(), 5)[0]
        assert result.token_ids == expected_seq
        assert result.blanks == [tok.decode(b) for b in expected_blanks]
        sequences, spans = fill_blanks(model, [context], TOK, Greedy(), 5)
        assert sequences[0] == expected_seq and spans[0] == expected_blanks
        assert "".join(stream_text(model, tok, text, Greedy(), 5)) == result.text


def test_filled_text_keeps_the_markers_of_other_kinds():
    tok, stub = CharTokenizer(), PositionStub()
    result = generate(stub, tok, "a[gMASK]b[MASK]c", Greedy(), 5)[0]
    # [MASK] at index 3 is filled with letter(3) letter(4) = "de"; the [gMASK] is kept as written
    assert result.blanks == ["de"]
    assert result.text == "a[gMASK]bdec"
