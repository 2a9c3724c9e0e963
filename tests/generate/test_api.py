"""Text in, text out (glm130b.generate.api): blanks filled left to right and put back in the text,
prompt errors, streaming, reproducible sampling, per-prompt options, the one default length."""

import inspect

import pytest

from glm130b.core.errors import InputError
from glm130b.generate import commands
from glm130b.generate.api import generate, generate_text, stream_text
from glm130b.generate.decode import DEFAULT_MAX_NEW_TOKENS, fill_blanks, generate_ids
from glm130b.generate.strategies import BeamSearch, Greedy, Sampling
from tests.generate.helpers import TOK, CharTokenizer, PositionStub, letter


def test_several_blanks_fill_left_to_right_and_reassemble():
    tok, stub = CharTokenizer(), PositionStub()
    prompts = ["ab[MASK]cd[MASK]e", "[MASK]h", "abc"]
    results = generate(stub, tok, prompts, Greedy(), 5)
    # prompt 0: first blank at index 2; it becomes 2 tokens, so the second [MASK] (index 5) moves to 6
    first, second = letter(2) + letter(3), letter(6) + letter(7)
    assert results[0].blanks == [first, second]
    assert results[0].text == "ab" + first + "cd" + second + "e"
    assert results[0].token_ids == tok.encode("ab" + first + "cd" + second + "e") + [TOK.eos]
    assert results[1].text == letter(0) + letter(1) + "h"
    # no marker: [gMASK] appended at index 3; <sop> at 4 -> letter(4), then letter(4) at 5 != letter(5)
    assert results[2].text == "abc" + letter(4)
    assert "".join(stream_text(stub, tok, prompts[0], Greedy(), 5)) == results[0].text


def test_prompt_errors_and_warnings():
    tok, stub = CharTokenizer(), PositionStub()
    with pytest.raises(InputError, match=r"unknown mask marker \[XMASK\]"):
        generate_text(stub, tok, "ab[XMASK]c")
    with pytest.warns(UserWarning, match=r"\[mask\] is not a mask marker"):  # plain text, as officially
        # 9 ids, [gMASK] appended at 9, <sop> at 10 -> letter(10), which ends the span
        assert generate_text(stub, tok, "ab[mask]c", max_new_tokens=2) == "ab[mask]c" + letter(10)
    with pytest.raises(InputError, match="more than the model's context of 64"):
        generate_text(stub, tok, "a" * 70)
    with pytest.raises(InputError, match="no room is left"):
        generate_text(stub, tok, "a" * 62)  # + [gMASK] + <sop> = 64
    with pytest.warns(UserWarning, match="only 2 of the 10 new tokens"):
        generate_text(stub, tok, "a" * 60, max_new_tokens=10)
    with pytest.warns(UserWarning, match=r"\[sMASK\] was never trained"):
        generate_text(stub, tok, "ab[sMASK]c", max_new_tokens=4)
    with pytest.raises(InputError, match="must end with <sop>"):
        generate_ids(stub, [[7, TOK.gmask]], TOK)


def test_text_api_stream_and_sampling_reproducible(trained):
    tok = CharTokenizer()
    assert generate_text(trained, tok, "abc", max_new_tokens=6) == "abccba"
    assert generate_text(trained, tok, "ab[MASK]f", "beam", max_new_tokens=6) == "abcdef"
    assert "".join(stream_text(trained, tok, "deg", max_new_tokens=6)) == "degged"
    pieces = list(stream_text(trained, tok, "bc[MASK]f", max_new_tokens=6))
    assert pieces == ["bc", "d", "e", "f"]  # prompt text, the blank letter by letter, the tail
    draw = lambda seed: generate(trained, tok, ["abc", "cd[MASK]h"], Sampling(temperature=2.0, seed=seed), 6)
    assert [r.text for r in draw(7)] == [r.text for r in draw(7)]


def test_per_prompt_sampling_options_follow_their_rows_across_passes(trained):
    """Row 0 has two blanks, row 1 one: the second pass runs row 0 alone with its own options."""
    tok = CharTokenizer()
    prompts = ["abc[MASK]d[MASK]e", "fed"]
    per_row = generate(trained, tok, prompts, Sampling(temperature=[0.0, 0.0], top_k=[0, 3], seed=0), 6)
    greedy = generate(trained, tok, prompts, Greedy(), 6)
    assert [r.text for r in per_row] == [r.text for r in greedy]
    with pytest.raises(InputError, match="top_k has 2 values for 1 prompts"):
        generate(trained, tok, ["abc"], Sampling(top_k=[1, 2]), 6)


def test_max_new_tokens_has_one_default():
    """The Python API, the id-level functions and the command line share DEFAULT_MAX_NEW_TOKENS."""
    for function in (generate, generate_text, stream_text, generate_ids, fill_blanks):
        assert inspect.signature(function).parameters["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS
    parser = commands.argparse.ArgumentParser()
    commands.add_generate_arguments(parser)
    assert parser.parse_args(["--checkpoint", "x"]).max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_strategy_defaults_are_the_official_scripts_and_the_command_lines():
    """GLM-130B's scripts/generate.sh: TEMP=1.0, TOPK=0, TOPP=0.7, NUM_BEAMS=4, LENGTH_PENALTY=1.0,
    NO_REPEAT_NGRAM=3, MIN_GEN_LENGTH=0; the Python API and `glm130b generate` both use them."""
    official = dict(
        temperature=1.0, top_k=0, top_p=0.7, num_beams=4, length_penalty=1.0, no_repeat_ngram_size=3, min_length=0
    )
    sampling, beam = Sampling(), BeamSearch()
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (1.0, 0, 0.7)
    assert {k: getattr(beam, k) for k in ("num_beams", "length_penalty", "no_repeat_ngram_size", "min_length")} == {
        k: official[k] for k in ("num_beams", "length_penalty", "no_repeat_ngram_size", "min_length")
    }
    parser = commands.argparse.ArgumentParser()
    commands.add_generate_arguments(parser)
    args = parser.parse_args(["--checkpoint", "x"])
    cli = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram,
        min_length=args.min_length,
    )
    assert cli == official


def test_min_new_tokens_holds_the_end_back(trained):
    tok = CharTokenizer()
    prompts = ["abc", "ab[MASK]f"]  # the trained reverser fills "cba" and "cde", then ends
    natural = [len(r.blanks[0]) for r in generate(trained, tok, prompts, Greedy(), 8)]
    assert natural == [3, 3]
    longer = generate(trained, tok, prompts, Greedy(), 8, min_new_tokens=5)
    assert [len(r.blanks[0]) for r in longer] == [5, 5] or all(len(r.blanks[0]) >= 5 for r in longer)
    assert [r.blanks[0][:3] for r in longer] == [r.blanks[0] for r in generate(trained, tok, prompts, Greedy(), 8)]
    with pytest.raises(InputError, match="min_new_tokens and begin_suppress_tokens are for greedy and sampling"):
        generate(trained, tok, prompts, "beam", 8, min_new_tokens=1)


def test_begin_suppress_tokens_ban_the_first_token_only(trained):
    tok = CharTokenizer()
    prompts = ["abc", "ab[MASK]f"]  # the trained reverser fills "cba" and "cde"
    natural = [r.blanks[0] for r in generate(trained, tok, prompts, Greedy(), 8)]
    assert natural == ["cba", "cde"]
    first = tok.encode("c")
    assert all(
        r.blanks[0] and r.blanks[0][0] != "c"
        for r in generate(trained, tok, prompts, Greedy(), 8, begin_suppress_tokens=first)
    )
    # "a" and "e" come later in the natural fills: banned at the first step only, they stay
    later = tok.encode("ae")
    assert [r.blanks[0] for r in generate(trained, tok, prompts, Greedy(), 8, begin_suppress_tokens=later)] == natural
    with pytest.raises(InputError, match="begin_suppress_tokens are for greedy and sampling"):
        generate(trained, tok, prompts, "beam", 8, begin_suppress_tokens=first)
