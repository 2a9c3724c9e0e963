"""Text prompts (glm130b.generate.prompts): markers split and checked, the context rule of SPEC.md
section 5 (the [gMASK] appended, eos after a right context), answers put back into the text."""

import pytest

from glm130b.core.errors import InputError
from glm130b.generate.prompts import parse_prompt
from tests.generate.helpers import TOK, CharTokenizer


def ids(text):
    return CharTokenizer().encode(text)


@pytest.mark.parametrize(
    "text, pieces, markers, context",
    [
        ("abc", ["abc", ""], ["[gMASK]"], ids("abc") + [TOK.gmask]),  # no marker: [gMASK] appended
        ("ab[gMASK]", ["ab", ""], ["[gMASK]"], ids("ab") + [TOK.gmask]),  # ends with its mask: no eos
        ("a[MASK]bc", ["a", "bc"], ["[MASK]"], ids("a") + [TOK.mask] + ids("bc") + [TOK.eos]),
        ("[MASK]a[MASK]", ["", "a", ""], ["[MASK]", "[MASK]"], [TOK.mask] + ids("a") + [TOK.mask]),
    ],
)
def test_context_rule(text, pieces, markers, context):
    prompt = parse_prompt(text, CharTokenizer())
    assert (prompt.pieces, prompt.markers, prompt.context) == (pieces, markers, context)


def test_filled_puts_each_blank_in_place_of_its_marker():
    assert parse_prompt("a[MASK]b[MASK]c", CharTokenizer()).filled(["XY", "Z"]) == "aXYbZc"
    assert parse_prompt("abc", CharTokenizer()).filled(["def"]) == "abcdef"  # [gMASK]: continued


@pytest.mark.parametrize(
    "text, message",
    [
        ("ab[XMASK]c", r"unknown mask marker \[XMASK\] but no \[MASK\], \[sMASK\] or \[gMASK\]"),
        ("ab MASK] c", r"holds 'MASK\]' but no \[MASK\]"),
    ],
)
def test_refused_where_the_official_rule_generates_nothing(text, message):
    """The official rule appends [gMASK] only to a text without "MASK]": with that text but no real
    marker there is no mask token at all, and the official code returns the prompt unchanged."""
    with pytest.raises(InputError, match=message):
        parse_prompt(text, CharTokenizer())


@pytest.mark.parametrize("text", ["a[ mask ]b", "a[XMASK]b[MASK]c", "ab[mask]"])
def test_marker_lookalikes_are_plain_text_with_a_warning(text):
    """The official code reads them as text (its pattern matches the three markers only); warned."""
    with pytest.warns(UserWarning, match="is not a mask marker and is kept as plain text"):
        prompt = parse_prompt(text, CharTokenizer())
    assert prompt.context[:-1] == CharTokenizer().encode_prompt(text)


def test_mixed_kinds_fill_one_kind_by_the_official_priority():
    tok = CharTokenizer()
    assert parse_prompt("a[MASK]b[gMASK]", tok).blank == "[MASK]"
    with pytest.warns(UserWarning, match="never trained"):
        assert parse_prompt("a[gMASK]b[sMASK]c", tok).blank == "[sMASK]"
    assert parse_prompt("a[MASK]b[gMASK]", tok, two_d=True).blank == "[gMASK]"  # ChatGLM-6B's order
    assert parse_prompt("a[MASK]b[gMASK]c", tok).filled(["XY"]) == "aXYb[gMASK]c"


def test_smask_is_accepted_with_a_warning():
    with pytest.warns(UserWarning, match=r"\[sMASK\] was never trained"):
        prompt = parse_prompt("ab[sMASK]c", CharTokenizer())
    assert prompt.context == ids("ab") + [TOK.smask] + ids("c") + [TOK.eos]
