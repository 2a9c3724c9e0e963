"""GLM's special tokens: their names, their ids, and the mask markers of a prompt (SPEC.md section 2)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# GLM-130B's special tokens in id order after the text ids (SAT's `_IceTokenizer` table). The mask
# tokens are named as written in prompts; the others as in SPEC.md section 2.
SPECIAL_NAMES = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
# The official prompt pattern (GLM-130B's generate.py): the markers that become mask tokens.
MASK_MARKER = re.compile(r"\[[sg]?MASK\]")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens. Defaults: GLM-130B (the 8 specials appended after icetk's 150000)."""

    mask: int = 150000  # [MASK]: short blank infilling
    gmask: int = 150001  # [gMASK]: left-to-right generation of a suffix
    smask: int = 150002  # [sMASK]: sentence mask, never trained in GLM-130B
    sop: int = 150004  # <sop>: first token of every generated span
    eop: int = 150005  # <eop>: end of a [MASK] span
    eos: int = 20002  # </s>: appended after a right context
    pad: int = 0

    @property
    def mask_ids(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


GLM130B_TOKENS = SpecialTokens()


def special_tokens_at(start: int, eos: int, pad: int) -> SpecialTokens:
    """The specials placed at start + i in SPECIAL_NAMES order (after a tokenizer's text ids)."""
    ids = {name: start + i for i, name in enumerate(SPECIAL_NAMES)}
    return SpecialTokens(
        mask=ids["[MASK]"],
        gmask=ids["[gMASK]"],
        smask=ids["[sMASK]"],
        sop=ids["<sop>"],
        eop=ids["<eop>"],
        eos=eos,
        pad=pad,
    )
