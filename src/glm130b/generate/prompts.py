"""Text prompts (SPEC.md section 5): `parse_prompt` splits a prompt at its mask markers, refuses
markers it does not know, and builds the context ids; `Prompt.filled` puts the answers back."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from glm130b.core.errors import InputError
from glm130b.tokenizer.specials import MASK_MARKER

# The official prompt pattern is MASK_MARKER; anything else that looks like a mask marker is refused.
MARKER_LIKE = re.compile(r"\[\s*[a-z]*\s*mask\s*\]", re.IGNORECASE)
KNOWN_MARKERS = ("[MASK]", "[sMASK]", "[gMASK]")


@dataclass
class Prompt:
    text: str
    pieces: list[str]        # the text between markers
    markers: list[str]       # the markers written in it ([gMASK] added when there was none)
    context: list[int]       # ids: mask tokens in place, eos after a right context; no <sop>

    def filled(self, blanks: list[str]) -> str:
        """The prompt's text with each marker replaced by its blank's text (a [gMASK] appended to a
        prompt without markers: the prompt followed by its continuation)."""
        out = [self.pieces[0]]
        for blank, piece in zip(blanks, self.pieces[1:]):
            out += [blank, piece]
        return "".join(out)


def check_markers(text: str) -> None:
    """Refuse unknown mask markers and mixed kinds; warn about [sMASK] (never trained)."""
    known = set(MASK_MARKER.findall(text))
    unknown = sorted({m for m in MARKER_LIKE.findall(text) if m not in KNOWN_MARKERS})
    if unknown:
        raise InputError(f"unknown mask marker {', '.join(unknown)}: write [MASK] for a blank to fill, "
                         "[gMASK] to continue the text (the default when there is no marker)")
    if len(known) > 1:
        raise InputError(f"the prompt mixes {', '.join(sorted(known))}: use one kind of mask per prompt")
    if "[sMASK]" in known:
        warnings.warn("[sMASK] was never trained in GLM-130B (SPEC.md section 2); expect poor spans. "
                      "Use [MASK] for short blanks or [gMASK] for long generation", stacklevel=4)


def parse_prompt(text: str, tokenizer) -> Prompt:
    """Split a prompt at its mask markers and build its context ids with `tokenizer.encode_prompt`
    (SPEC.md section 5): [gMASK] appended when there is no marker, eos after a right context."""
    check_markers(text)
    pieces = MASK_MARKER.split(text)
    markers = MASK_MARKER.findall(text)
    ids = tokenizer.encode_prompt(text)
    specials = tokenizer.specials
    if not markers:
        markers = ["[gMASK]"]
        pieces = [text, ""]
        ids = ids + [specials.gmask]
    if ids[-1] not in specials.mask_ids:
        ids = ids + [specials.eos]
    return Prompt(text, pieces, markers, ids)
