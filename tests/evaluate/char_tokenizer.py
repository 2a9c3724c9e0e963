"""A character tokenizer with GLM special ids, free of glm130b imports so that the official-code
oracle (tests/evaluate/official_oracle.py, run in another virtualenv) tokenizes exactly as the tests do."""

import string

ALPHABET = " " + string.ascii_lowercase + string.punctuation  # punctuation: LAMBADA bans each mark
SPECIAL_IDS = dict(pad=0, mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6)
FIRST_TEXT_ID = 8  # ids 0..7: the specials (7 unused)
VOCAB_SIZE = FIRST_TEXT_ID + len(ALPHABET)
SPECIAL_NAMES = {
    0: "<pad>",
    1: "[MASK]",
    2: "[gMASK]",
    3: "[sMASK]",
    4: "<sop>",
    5: "<eop>",
    6: "</s>",
    7: "<unused>",
}  # letters and punctuation only: decoded text encodes again


class CharTokenizerBase:
    vocab_size = VOCAB_SIZE

    def fingerprint(self) -> str:
        return "char-tokenizer"  # a fixed name: the stub has no model file to hash

    def encode(self, text: str) -> list[int]:
        return [FIRST_TEXT_ID + ALPHABET.index(c) for c in text.lower()]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]  # the official beam search hands over tensors
        return "".join(ALPHABET[i - FIRST_TEXT_ID] if i >= FIRST_TEXT_ID else SPECIAL_NAMES[i] for i in ids)
