"""Tokenizers (SPEC.md sections 2 and 5): text <-> ids, and prompts with mask markers -> ids.

`Tokenizer` is the one interface: text ids from a SentencePiece model at a fixed offset, the GLM
special tokens at fixed ids outside the model. `IceTokenizer` has GLM-130B's icetk layout,
`BilingualTokenizer` is ours (trained by `train_tokenizer`); `load_tokenizer` reads either from a
saved folder, or icetk's ice_text.model. Id layouts and verification: docs/tokenizer.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import sentencepiece as spm

from glm130b.core.atomic import atomic_write_bytes
from glm130b.core.config_io import read_mapping, write_mapping
from glm130b.core.errors import ConfigError, GLMError
from glm130b.tokenizer.specials import GLM130B_TOKENS, MASK_MARKER, SPECIAL_NAMES, special_tokens_at
from glm130b.tokenizer.training import train_sentencepiece

META_FILE = "tokenizer.json"
ICE_MODEL_FILE = "ice_text.model"  # the name icetk reads from its model folder
BILINGUAL_MODEL_FILE = "tokenizer.model"

EOS_NAME, PAD_NAME = "</s>", "<pad>"

ICE_IMAGE_IDS = 20000  # icetk ids below 20000 are image tokens; text ids follow them
ICE_SPECIALS_START = 150000  # SAT fixes the specials here (icetk's 20000 image + 130000 text ids)
ICE_NEWLINE = "<n>"  # the piece GLM-130B's training data used for "\n" (id 20004)
NEWLINE_MODES = ("pass", ICE_NEWLINE)


class TokenizerError(GLMError):
    """A tokenizer file or folder that is missing or does not match, or an id it cannot decode."""


def _load_sentencepiece(model_proto: bytes, source: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except RuntimeError as err:
        raise TokenizerError(
            f"{source} is not a SentencePiece model ({err}); pass the .model file that SentencePiece training wrote"
        ) from None
    return sp


class Tokenizer:
    """Text ids = SentencePiece ids + `text_id_offset`; GLM specials at `specials_start + i`."""

    kind: str  # recorded in tokenizer.json; selects the class on load
    model_file: str  # the model's file name inside a saved folder

    def __init__(
        self,
        model_proto: bytes,
        sp: spm.SentencePieceProcessor,
        text_id_offset: int,
        specials_start: int,
        eos: int,
        pad: int,
        source: str,
    ):
        self._model_proto = model_proto
        self._sp = sp
        self.text_id_offset = text_id_offset
        self.num_pieces = self._sp.get_piece_size()
        if text_id_offset + self.num_pieces > specials_start:
            raise TokenizerError(
                f"{source} has {self.num_pieces} pieces: text ids reach "
                f"{text_id_offset + self.num_pieces - 1}, past the first special id "
                f"{specials_start}; use a model with at most {specials_start - text_id_offset} pieces"
            )
        self.specials = special_tokens_at(specials_start, eos=eos, pad=pad)
        self.vocab_size = specials_start + len(SPECIAL_NAMES)
        self._special_names = {specials_start + i: name for i, name in enumerate(SPECIAL_NAMES)}
        self._special_names.update({eos: EOS_NAME, pad: PAD_NAME})
        self._marker_ids = {
            "[MASK]": self.specials.mask,
            "[sMASK]": self.specials.smask,
            "[gMASK]": self.specials.gmask,
        }
        # Batch encoding runs on SentencePiece's own C++ threads, one text per task.
        self.num_threads = os.cpu_count() or 1

    # -- encoding ------------------------------------------------------------------------------
    def _piece_ids(self, texts: list[str]) -> list[list[int]]:
        """SentencePiece ids of each text (subclasses adjust the text first)."""
        if len(texts) == 1:
            return [self._sp.encode(texts[0])]
        return self._sp.encode(texts, num_threads=self.num_threads)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; mask markers written in it are ordinary text here."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        piece_ids = self._piece_ids(list(texts))
        offset = self.text_id_offset
        return piece_ids if offset == 0 else [[i + offset for i in ids] for ids in piece_ids]

    def encode_prompt(self, text: str) -> list[int]:
        """SPEC 5: split at [MASK]/[sMASK]/[gMASK], encode each piece on its own, insert the mask ids.
        Nothing is appended: glm130b.generate.prompts.parse_prompt adds [gMASK] and eos by the official
        rule, which reads the text (eos unless it ends with "MASK]"); then <sop> starts the span."""
        pieces = MASK_MARKER.split(text)
        markers = MASK_MARKER.findall(text)
        ids: list[int] = []
        for piece_ids, marker in zip(self.encode_batch(pieces), markers + [None]):
            ids += piece_ids
            if marker is not None:
                ids.append(self._marker_ids[marker])
        return ids

    # -- decoding ------------------------------------------------------------------------------
    def _decode_pieces(self, piece_ids: list[int]) -> str:
        return self._sp.decode(piece_ids)

    def decode(self, ids) -> str:
        """Text of the ids; special tokens rendered by name ("[gMASK]", "<sop>", "</s>", "<pad>")."""
        out: list[str] = []
        run: list[int] = []  # SentencePiece ids since the last special, decoded together
        for token in (int(t) for t in ids):
            name = self._special_names.get(token)
            if name is None:
                piece = token - self.text_id_offset
                if not 0 <= piece < self.num_pieces:
                    raise TokenizerError(
                        f"token id {token} is neither a text id "
                        f"[{self.text_id_offset}, {self.text_id_offset + self.num_pieces}) nor a "
                        f"special token of this tokenizer; decode only ids it produced"
                    )
                run.append(piece)
                continue
            out += [self._decode_pieces(run), name]
            run = []
        out.append(self._decode_pieces(run))
        return "".join(out)

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each id stands for: a byte-fallback piece one, "\u2581" a space, a
        special or control id none. Summed over a span: the byte length of its decoded text (our
        tokenizer adds no dummy-prefix space)."""
        lengths = [0] * self.vocab_size
        for piece in range(self.num_pieces):
            if self._sp.is_byte(piece):
                lengths[piece + self.text_id_offset] = 1
            elif not (self._sp.is_control(piece) or self._sp.is_unknown(piece)):
                text = self._sp.id_to_piece(piece).replace("\u2581", " ")
                lengths[piece + self.text_id_offset] = len(text.encode())
        return lengths

    def whitespace_ids(self) -> list[int]:
        """Text ids that decode to whitespace only (the lone "▁", runs of spaces, the bytes of
        newline and tab): what a filled blank should not start with (generate's
        begin_suppress_tokens)."""
        ids = []
        for piece in range(self.num_pieces):
            if not (self._sp.is_control(piece) or self._sp.is_unknown(piece)):
                text = self.decode([piece + self.text_id_offset])
                if text and text.isspace():
                    ids.append(piece + self.text_id_offset)
        return ids

    # -- identity and storage --------------------------------------------------------------------
    def layout(self) -> dict:
        """Everything besides the model file that decides the ids."""
        return {
            "kind": self.kind,
            "text_id_offset": self.text_id_offset,
            "vocab_size": self.vocab_size,
            "specials": asdict(self.specials),
        }

    def fingerprint(self) -> str:
        """sha256 over the model file and the id layout: equal fingerprints give equal ids."""
        digest = hashlib.sha256(self._model_proto)
        digest.update(json.dumps(self.layout(), sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write the model file and tokenizer.json (layout + fingerprint) into one folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / self.model_file, self._model_proto)
        write_mapping(
            directory / META_FILE, {**self.layout(), "model_file": self.model_file, "fingerprint": self.fingerprint()}
        )
        return directory


class IceTokenizer(Tokenizer):
    """GLM-130B's tokenizer over icetk's `ice_text.model` (SPEC 2), id for id as the official
    icetk + SwissArmyTransformer `_IceTokenizer` produce them.

    newline: "pass" hands "\\n" to SentencePiece unchanged (the official inference code);
    "<n>" maps it to the `<n>` piece first (id 20004, the training data). Decoding always turns
    `<n>` back into "\\n", as icetk does."""

    kind = "icetk"
    model_file = ICE_MODEL_FILE

    def __init__(self, path: str | Path, newline: str = "pass"):
        path = Path(path)
        model = path / ICE_MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise TokenizerError(
                f"no icetk model at {model}: pass ice_text.model (sha256 5e974d9a...) or the folder holding it"
            )
        if newline not in NEWLINE_MODES:
            raise TokenizerError(
                f"newline={newline!r}: choose 'pass' (the official inference code) or "
                f"'{ICE_NEWLINE}' (GLM-130B's training data)"
            )
        self.newline = newline
        model_proto = model.read_bytes()
        super().__init__(
            model_proto,
            _load_sentencepiece(model_proto, str(model)),
            text_id_offset=ICE_IMAGE_IDS,
            specials_start=ICE_SPECIALS_START,
            eos=GLM130B_TOKENS.eos,
            pad=GLM130B_TOKENS.pad,
            source=str(model),
        )

    def _piece_ids(self, texts: list[str]) -> list[list[int]]:
        if self.newline == ICE_NEWLINE:
            texts = [t.replace("\n", ICE_NEWLINE) for t in texts]
        return super()._piece_ids(texts)

    def _decode_pieces(self, piece_ids: list[int]) -> str:
        return super()._decode_pieces(piece_ids).replace(ICE_NEWLINE, "\n")

    def layout(self) -> dict:
        return {**super().layout(), "newline": self.newline}


class BilingualTokenizer(Tokenizer):
    """Our SentencePiece tokenizer (trained by glm130b.tokenizer.training): pad 0, unk 1, eos 2, the
    pieces, then the eight GLM specials; exact round trip of every string."""

    kind = "bilingual"
    model_file = BILINGUAL_MODEL_FILE

    def __init__(self, model_proto: bytes, source: str = "model"):
        sp = _load_sentencepiece(model_proto, source)
        super().__init__(
            model_proto,
            sp,
            text_id_offset=0,
            specials_start=sp.get_piece_size(),
            eos=sp.eos_id(),
            pad=sp.pad_id(),
            source=source,
        )
        if self.specials.eos < 0 or self.specials.pad < 0 or not self._sp.IsByte(self._byte_ids(" ")[0]):
            raise TokenizerError(
                f"{source} lacks eos, pad or byte-fallback pieces; train it with `glm130b tokenizer train`"
            )
        # SentencePiece reads U+2581 as its space symbol, so a literal one would decode as " ":
        # it is encoded as its three UTF-8 byte pieces instead.
        self._meta_space_ids = self._byte_ids("\u2581")

    def _byte_ids(self, text: str) -> list[int]:
        return [self._sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode()]

    def _piece_ids(self, texts: list[str]) -> list[list[int]]:
        result = super()._piece_ids(["" if "\u2581" in t else t for t in texts])
        for i, text in enumerate(texts):
            if "\u2581" in text:  # rare: encode around each literal U+2581 (no dummy prefix, so parts concatenate)
                parts = super()._piece_ids(text.split("\u2581"))
                result[i] = parts[0]
                for part in parts[1:]:
                    result[i] += self._meta_space_ids + part
        return result


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Either tokenizer: a folder written by `save`, or an icetk ice_text.model (file or folder)."""
    path = Path(path)
    if path.is_file():  # a model file: its kind comes from the folder's metadata, not the file's shape
        if (path.parent / META_FILE).is_file():
            return load_tokenizer(path.parent)
        if path.name != ICE_MODEL_FILE:
            raise TokenizerError(
                f"{path} is a model file without the {META_FILE} that says which tokenizer it "
                f"is; pass the folder written by `glm130b tokenizer train`, or icetk's "
                f"{ICE_MODEL_FILE}"
            )
        return IceTokenizer(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        if (path / ICE_MODEL_FILE).is_file():
            return IceTokenizer(path)
        raise TokenizerError(
            f"{path} holds neither {META_FILE} (a saved tokenizer) nor {ICE_MODEL_FILE}; "
            "train one with `glm130b tokenizer train` or pass the icetk model"
        )
    try:
        meta = read_mapping(meta_file, "tokenizer")
    except ConfigError as err:
        raise TokenizerError(f"{meta_file} is damaged ({err}); save the tokenizer again") from None
    model = path / meta["model_file"]
    if not model.is_file():
        raise TokenizerError(f"{model} is missing: {meta_file} names it; copy the whole tokenizer folder")
    if meta["kind"] == IceTokenizer.kind:
        tokenizer: Tokenizer = IceTokenizer(model, newline=meta["newline"])
    elif meta["kind"] == BilingualTokenizer.kind:
        tokenizer = BilingualTokenizer(model.read_bytes(), source=str(model))
    else:
        raise TokenizerError(f"{meta_file}: unknown tokenizer kind {meta['kind']!r}")
    if tokenizer.fingerprint() != meta["fingerprint"]:
        raise TokenizerError(
            f"{model} does not match the fingerprint in {meta_file}: the model file was "
            "replaced; save the tokenizer again or restore its model file"
        )
    return tokenizer


def train_tokenizer(
    texts_or_files: Iterable[str | os.PathLike], out_dir: str | Path, vocab_size: int = 16384, **options
) -> BilingualTokenizer:
    """Train our tokenizer with `vocab_size` ids in all (pieces + the 8 specials), save it to `out_dir`,
    return it. A `str` item is a text, a path object a .jsonl(.gz) or text file; `options` go to
    glm130b.tokenizer.training.train_sentencepiece (character_coverage, input_sentence_size, num_threads, seed)."""
    tokenizer = BilingualTokenizer(train_sentencepiece(texts_or_files, vocab_size - len(SPECIAL_NAMES), **options))
    tokenizer.save(out_dir)
    return tokenizer
