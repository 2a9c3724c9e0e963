"""Text prompts (glm130b.generate.prompts): markers split and checked, the context rule of SPEC.md
section 5 (the [gMASK] appended, eos after a right context), answers put back into the text."""

import pytest

from glm130b.core.errors import InputError
from glm130b.generate.prompts import parse_prompt
from tests.generate.helpers import TOK, CharTokenizer


def ids(text):
    return CharTokenizer().encode(text)


@pytest.mark.parametrize("text, pieces, markers, context", [
    ("abc", ["abc", ""], ["[gMASK]"], ids("abc") + [TOK.gmask]),         # no marker: [gMASK] appended
    ("ab[gMASK]", ["ab", ""], ["[gMASK]"], ids("ab") + [TOK.gmask]),     # ends with its mask: no eos
    ("a[MASK]bc", ["a", "bc"], ["[MASK]"], ids("a") + [TOK.mask] + ids("bc") + [TOK.eos]),
    ("[MASK]a[MASK]", ["", "a", ""], ["[MASK]", "[MASK]"], [TOK.mask] + ids("a") + [TOK.mask]),
])
def test_context_rule(text, pieces, markers, context):
    prompt = parse_prompt(text, CharTokenizer())
    assert (prompt.pieces, prompt.markers, prompt.context) == (pieces, markers, context)


def test_filled_puts_each_blank_in_place_of_its_marker():
    assert parse_prompt("a[MASK]b[MASK]c", CharTokenizer()).filled(["XY", "Z"]) == "aXYbZc"
    assert parse_prompt("abc", CharTokenizer()).filled(["def"]) == "abcdef"  # [gMASK]: continued


@pytest.mark.parametrize("text, message", [("ab[XMASK]c", r"unknown mask marker \[XMASK\]"),
                                           ("a[ mask ]b", r"unknown mask marker \[ mask \]"),
                                           ("a[MASK]b[gMASK]", r"mixes \[MASK\], \[gMASK\]")])
def test_refused_markers(text, message):
    with pytest.raises(InputError, match=message):
        parse_prompt(text, CharTokenizer())


def test_smask_is_accepted_with_a_warning():
    with pytest.warns(UserWarning, match=r"\[sMASK\] was never trained"):
        prompt = parse_prompt("ab[sMASK]c", CharTokenizer())
    assert prompt.context == ids("ab") + [TOK.smask] + ids("c") + [TOK.eos]
