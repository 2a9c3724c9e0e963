"""Text in, text out: `generate` (a batch of prompts), `generate_text` (one string) and
`stream_text` (the answer piece by piece), over a model and a tokenizer (docs/generation.md)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from glm130b.core.errors import GLMError
from glm130b.generate.decode import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STRATEGY,
    banned_tokens,
    end_tokens,
    fill_blanks,
    generate_ids,
    iterate_tokens,
    room_to_generate,
)
from glm130b.generate.prompts import marker_ids, parse_prompt
from glm130b.generate.strategies import BeamSearch, Strategy, strategy_from_name
from glm130b.model.glm import GLM


@dataclass
class GenerationResult:
    text: str  # the prompt with each marker replaced by its generated text
    blanks: list[str]  # the generated text of each blank, in order
    token_ids: list[int]  # the final sequence: context with every span in place


def _two_d(model: GLM) -> bool:
    return model.config.position_encoding == "2d"


def _as_strategy(strategy: Strategy | str) -> Strategy:
    return strategy_from_name(strategy) if isinstance(strategy, str) else strategy


def generate(
    model: GLM,
    tokenizer,
    prompts: str | list[str],
    strategy: Strategy | str = DEFAULT_STRATEGY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    compile: bool = False,
    min_new_tokens: int = 0,
    begin_suppress_tokens: Sequence[int] = (),
) -> list[GenerationResult]:
    """Generate for a batch of text prompts. Each prompt holds [MASK] blanks (filled left to right),
    [gMASK] (continue; appended when no marker is written) or [sMASK] (warned: never trained); with
    several kinds, the official rule fills one: [MASK] before [sMASK] before [gMASK].
    `min_new_tokens`: no blank ends before that many tokens (1: never an empty fill);
    `begin_suppress_tokens`: ids no blank starts with (e.g. whitespace-only pieces, so that a fill
    starts with text: Tokenizer.whitespace_ids)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    parsed = [parse_prompt(p, tokenizer, _two_d(model)) for p in prompts]
    banned = banned_tokens(tokenizer.specials, model.config.vocab_size, tokenizer.vocab_size)
    sequences, spans = fill_blanks(
        model,
        [p.context for p in parsed],
        tokenizer.specials,
        _as_strategy(strategy),
        max_new_tokens,
        banned=banned,
        compile=compile,
        min_new_tokens=min_new_tokens,
        begin_suppress_tokens=begin_suppress_tokens,
    )
    results = []
    for prompt, sequence, item_spans in zip(parsed, sequences, spans):
        blanks = [tokenizer.decode(span) for span in item_spans]
        results.append(GenerationResult(prompt.filled(blanks), blanks, sequence))
    return results


def generate_text(
    model: GLM,
    tokenizer,
    prompt: str,
    strategy: Strategy | str = DEFAULT_STRATEGY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    compile: bool = False,
) -> str:
    """The prompt with its blanks filled (or continued after [gMASK]): one string."""
    return generate(model, tokenizer, prompt, strategy, max_new_tokens, compile=compile)[0].text


def stream_text(
    model: GLM,
    tokenizer,
    prompt: str,
    strategy: Strategy | str = DEFAULT_STRATEGY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    compile: bool = False,
) -> Iterator[str]:
    """Yield the answer as it is produced: the prompt's text up to its first blank, the blank's
    text token by token, the text up to the next blank, and so on (a [gMASK] prompt: the prompt,
    then its continuation; markers of a kind not filled come back as written).
    "".join(stream_text(...)) == generate_text(...) for the same draws. Beam search yields each
    blank whole once its search ends."""
    strategy = _as_strategy(strategy)
    parsed = parse_prompt(prompt, tokenizer, _two_d(model))
    specials = tokenizer.specials
    blank = marker_ids(specials)[parsed.blank]
    banned = banned_tokens(specials, model.config.vocab_size, tokenizer.vocab_size)
    ends = end_tokens(specials)
    sequence = list(parsed.context)
    yield parsed.pieces[0]
    for marker, piece in zip(parsed.markers, parsed.pieces[1:]):
        if marker != parsed.blank:  # a mask of another kind stays as written
            yield marker + piece
            continue
        at = sequence.index(blank)
        context = sequence + [specials.sop]
        if isinstance(strategy, BeamSearch):
            span = generate_ids(model, [context], specials, strategy, max_new_tokens, banned=banned, compile=compile)[0]
            yield tokenizer.decode(span)
        else:
            span, shown = [], ""
            limit = room_to_generate(model, [context], max_new_tokens)
            for tokens, _ in iterate_tokens(
                model, [context], specials, strategy, limit, banned, compile, check_every=1
            ):
                token = int(tokens[0])  # one sync per token: the price of streaming
                if token in ends:
                    break
                span.append(token)
                text = tokenizer.decode(span)
                # Hold back text that may still change (an incomplete multi-byte character).
                if text.startswith(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown) :]
                    shown = text
            text = tokenizer.decode(span)
            if text != shown:
                if not text.startswith(shown):
                    raise GLMError("the tokenizer changed text it had already decoded; use generate_text")
                yield text[len(shown) :]
        sequence = sequence[:at] + span + sequence[at + 1 :]
        yield piece
