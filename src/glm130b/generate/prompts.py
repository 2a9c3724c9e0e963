"""Text prompts (SPEC.md section 5): `parse_prompt` splits a prompt at its mask markers, picks the
kind of blank to fill and builds the context ids by the official rule (GLM-130B's generate.py);
`Prompt.filled` puts the answers back."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from glm130b.core.errors import InputError
from glm130b.generate.inputs import mask_priority
from glm130b.tokenizer.specials import MASK_MARKER, SpecialTokens

# Text that looks like a mask marker but is not one of the three: the official code reads it as
# plain text; it is warned about, since it is most likely a typo.
MARKER_LIKE = re.compile(r"\[\s*[a-z]*\s*mask\s*\]", re.IGNORECASE)
KNOWN_MARKERS = ("[MASK]", "[sMASK]", "[gMASK]")
# The official test for "the prompt ends with its mask" (no eos then), and for "the prompt has a
# marker" (no [gMASK] appended then): substrings of the text, not of its ids.
MASK_SUFFIX = "MASK]"


def marker_ids(specials: SpecialTokens) -> dict[str, int]:
    return {"[MASK]": specials.mask, "[sMASK]": specials.smask, "[gMASK]": specials.gmask}


@dataclass
class Prompt:
    text: str
    pieces: list[str]  # the text between markers
    markers: list[str]  # every marker written in it ([gMASK] added when there was none)
    blank: str  # the kind of marker filled: the others stay as written
    context: list[int]  # ids: mask tokens in place, eos unless the text ends with "MASK]"; no <sop>

    def filled(self, blanks: list[str]) -> str:
        """The prompt's text with each marker of the filled kind replaced by its blank's text, in
        order (a [gMASK] appended to a prompt without markers: the prompt followed by its
        continuation); markers of other kinds are kept as written."""
        answers = iter(blanks)
        out = [self.pieces[0]]
        for marker, piece in zip(self.markers, self.pieces[1:]):
            out += [next(answers, marker) if marker == self.blank else marker, piece]
        return "".join(out)


def blank_marker(markers: list[str], specials: SpecialTokens, two_d: bool = False) -> str:
    """The kind of marker filled, by glm130b.generate.inputs.mask_priority (the rule on ids too):
    [MASK] if the prompt has one, else [sMASK], else [gMASK] (ChatGLM-6B, 2-D: [gMASK] first)."""
    name = {token: marker for marker, token in marker_ids(specials).items()}
    return next(name[t] for t in mask_priority(specials, two_d) if name[t] in markers)


def check_markers(text: str) -> None:
    """Refuse a prompt on which the official rule would generate nothing; warn about text that
    looks like a marker (kept as text, as the official code does) and about [sMASK] (never trained)."""
    known = set(MASK_MARKER.findall(text))
    unknown = sorted({m for m in MARKER_LIKE.findall(text) if m not in KNOWN_MARKERS})
    if not known and MASK_SUFFIX in text:
        # The official rule appends [gMASK] only when the text lacks "MASK]": here it would
        # append nothing, find no mask token and generate nothing.
        what = f"unknown mask marker {', '.join(unknown)}" if unknown else f"'{MASK_SUFFIX}'"
        raise InputError(
            f"the prompt holds {what} but no [MASK], [sMASK] or [gMASK]: the official rule would "
            "then generate nothing; write [MASK] for a blank to fill, [gMASK] to continue the text"
        )
    if unknown:
        warnings.warn(
            f"{', '.join(unknown)} is not a mask marker and is kept as plain text (as the official "
            "code does); mask markers are [MASK], [sMASK] and [gMASK]",
            stacklevel=4,
        )
    if "[sMASK]" in known:
        warnings.warn(
            "[sMASK] was never trained in GLM-130B (SPEC.md section 2); expect poor spans. "
            "Use [MASK] for short blanks or [gMASK] for long generation",
            stacklevel=4,
        )


def parse_prompt(text: str, tokenizer, two_d: bool = False) -> Prompt:
    """Split a prompt at its mask markers and build its context ids with `tokenizer.encode_prompt`
    (SPEC.md section 5), as GLM-130B's generate.py does: [gMASK] appended when there is no marker;
    eos appended unless the text ends with "MASK]" (so "the [MASK] " with a trailing space gets
    one). `two_d`: ChatGLM-6B's choice of the kind to fill (`blank_marker`)."""
    check_markers(text)
    pieces = MASK_MARKER.split(text)
    markers = MASK_MARKER.findall(text)
    ids = tokenizer.encode_prompt(text)
    specials = tokenizer.specials
    if not markers:
        markers = ["[gMASK]"]
        pieces = [text, ""]
        ids = ids + [specials.gmask]  # the official text becomes `text + " [gMASK]"`: no eos
    elif not text.endswith(MASK_SUFFIX):
        ids = ids + [specials.eos]
    return Prompt(text, pieces, markers, blank_marker(markers, specials, two_d), ids)
