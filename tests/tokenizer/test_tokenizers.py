"""Our bilingual tokenizer (glm130b.tokenizer.BilingualTokenizer, trained by train_tokenizer):
exact round trip, the id layout, prompts (SPEC.md section 5), save/load and the CLI."""

import gzip
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from glm130b.cli.commands import main
from glm130b.core.errors import GLMError
from glm130b.generate.inputs import generation_context
from glm130b.tokenizer.tokenizers import (
    BilingualTokenizer,
    IceTokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)
from tests.helpers import FIXTURES, SHARED

STRINGS = json.loads((FIXTURES / "tokenizer" / "strings.json").read_text())
ALL_STRINGS = [s for items in STRINGS.values() for s in items]
VALID_CORPUS = SHARED / "data" / "corpus" / "valid.jsonl.gz"
GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
# Text that a tokenizer must not mistake for special tokens or control pieces.
LOOKALIKES = ["[MASK]", "[gMASK]", "<sop>", "</s>", "<pad>", "<unk>", "<0x41>", "\u2581", "a\u2581b \u2581\u2581"]
# 256 byte pieces + 3 control pieces + the ~450 characters of the fixture strings + some merges,
# within the ~560 pieces SentencePiece can find in them.
TINY_VOCAB = 520


def random_text(rng: random.Random, length: int) -> str:
    """Any Unicode scalar values (no surrogates, which UTF-8 cannot hold), ASCII and CJK made likely."""
    chars = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.4:
            chars.append(chr(rng.randrange(0x20, 0x7F)))
        elif kind < 0.6:
            chars.append(chr(rng.randrange(0x4E00, 0x9FFF)))
        elif kind < 0.7:
            chars.append(rng.choice(" \n\t\r\u3000\u00a0\u2581"))
        else:
            code = rng.randrange(0, 0x110000 - 0x800)
            chars.append(chr(code + 0x800 if code >= 0xD800 else code))
    return "".join(chars)


def train_tiny(out_dir: Path, vocab_size: int = TINY_VOCAB) -> BilingualTokenizer:
    return train_tokenizer(
        [s for s in ALL_STRINGS if s] * 10, out_dir, vocab_size=vocab_size, character_coverage=1.0, num_threads=1
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    train_tiny(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> BilingualTokenizer:
    return load_tokenizer(tiny_folder)


@pytest.fixture(scope="module")
def corpus_records() -> list[dict]:
    if not VALID_CORPUS.is_file():
        pytest.skip(f"real corpus sample {VALID_CORPUS} is absent (shared/ sits beside the repository)")
    with gzip.open(VALID_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus_tokenizer(corpus_records, tmp_path_factory) -> BilingualTokenizer:
    """Trained on the sample file itself, read through the .jsonl.gz path of train_tokenizer."""
    return train_tokenizer([VALID_CORPUS], tmp_path_factory.mktemp("corpus"), vocab_size=3000, character_coverage=0.98)


def test_round_trip_fixture_strings(tiny):
    for text in ALL_STRINGS + LOOKALIKES:
        assert tiny.decode(tiny.encode(text)) == text


def test_round_trip_random_unicode(tiny):
    rng = random.Random(0)
    texts = [random_text(rng, rng.randrange(0, 60)) for _ in range(300)]
    assert [tiny.decode(ids) for ids in tiny.encode_batch(texts)] == texts


def test_round_trip_real_corpus(corpus_tokenizer, corpus_records):
    texts = [r["text"] for r in corpus_records]
    ids = corpus_tokenizer.encode_batch(texts)
    assert [corpus_tokenizer.decode(x) for x in ids] == texts
    assert corpus_tokenizer.vocab_size == 3000
    unk = 1
    assert not any(unk in x for x in ids)  # byte fallback: nothing becomes <unk>
    for lang in ("en", "zh"):  # a trained vocabulary: well under one token per UTF-8 byte in both languages
        docs = [r["text"] for r in corpus_records if r["lang"] == lang]
        num_bytes = sum(len(t.encode()) for t in docs)
        assert docs and sum(len(x) for x in corpus_tokenizer.encode_batch(docs)) < num_bytes / 2


def test_id_layout(tiny, tiny_folder):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_folder / "tokenizer.model"))
    n = sp.get_piece_size()
    assert tiny.vocab_size == TINY_VOCAB == n + len(GLM_SPECIALS)
    s = tiny.specials
    assert [s.mask, s.gmask, s.smask, s.sop, s.eop] == [n, n + 1, n + 2, n + 4, n + 5]
    assert (sp.id_to_piece(s.eos), sp.id_to_piece(s.pad), sp.id_to_piece(1)) == ("</s>", "<pad>", "<unk>")
    assert [tiny.decode([n + i]) for i in range(len(GLM_SPECIALS))] == list(GLM_SPECIALS)
    assert tiny.decode([s.eos, s.pad]) == "</s><pad>"
    # plain text never yields a special, eos or pad id, even when it spells one
    for ids in tiny.encode_batch(ALL_STRINGS + LOOKALIKES):
        assert all(2 < i < n for i in ids)


def test_encode_batch_equals_encode(tiny):
    texts = ALL_STRINGS + LOOKALIKES
    assert tiny.encode_batch(texts) == [tiny.encode(t) for t in texts]


def test_prompt_pieces_are_encoded_on_their_own(tiny):
    s = tiny.specials
    text = "The capital of France is [MASK], of China [sMASK]; go on [gMASK]"
    expected = (
        tiny.encode("The capital of France is ")
        + [s.mask]
        + tiny.encode(", of China ")
        + [s.smask]
        + tiny.encode("; go on ")
        + [s.gmask]
    )
    assert tiny.encode_prompt(text) == expected
    # no dummy prefix: the pieces concatenate, so prompts decode to themselves
    for prompt in STRINGS["prompts"]:
        assert tiny.decode(tiny.encode_prompt(prompt)) == prompt


def test_prompt_rule_with_generation_context(tiny):
    s = tiny.specials

    def context(text):
        return generation_context(tiny.encode_prompt(text), s, default_mask=s.gmask)

    assert context("hello") == tiny.encode("hello") + [s.gmask, s.sop]
    assert context("a [MASK] b") == tiny.encode("a ") + [s.mask] + tiny.encode(" b") + [s.eos, s.sop]
    assert context("a [MASK]") == tiny.encode("a ") + [s.mask, s.sop]
    assert context("[mask] stays text") == tiny.encode("[mask] stays text") + [s.gmask, s.sop]


def test_save_load_and_fingerprint(tiny, tmp_path):
    tiny.save(tmp_path / "copy")
    loaded = load_tokenizer(tmp_path / "copy")
    assert isinstance(loaded, BilingualTokenizer)
    assert loaded.fingerprint() == tiny.fingerprint()
    assert loaded.specials == tiny.specials and loaded.vocab_size == tiny.vocab_size
    assert loaded.encode_batch(ALL_STRINGS) == tiny.encode_batch(ALL_STRINGS)
    other = train_tiny(tmp_path / "other", vocab_size=TINY_VOCAB + 20)
    assert other.fingerprint() != tiny.fingerprint()
    # a model file swapped under a saved tokenizer is refused
    (tmp_path / "copy" / "tokenizer.model").write_bytes((tmp_path / "other" / "tokenizer.model").read_bytes())
    with pytest.raises(TokenizerError, match="fingerprint"):
        load_tokenizer(tmp_path / "copy")


def test_saved_metadata_is_json_and_a_damaged_one_is_refused(tiny, tmp_path):
    tiny.save(tmp_path / "copy")
    meta = json.loads((tmp_path / "copy" / "tokenizer.json").read_text())
    assert meta == {**tiny.layout(), "model_file": "tokenizer.model", "fingerprint": tiny.fingerprint()}
    assert not list((tmp_path / "copy").glob(".*"))  # written atomically: no temporaries left
    (tmp_path / "copy" / "tokenizer.json").write_text('{"kind": "bilingual",')
    with pytest.raises(TokenizerError, match="tokenizer.json is damaged.*save the tokenizer again"):
        load_tokenizer(tmp_path / "copy")


def test_training_is_reproducible(tiny, tmp_path):
    again = train_tiny(tmp_path)
    assert again.fingerprint() == tiny.fingerprint()


def test_user_errors(tiny, tmp_path):
    with pytest.raises(GLMError, match="raise the vocabulary size"):
        train_tokenizer(ALL_STRINGS, tmp_path / "small", vocab_size=100)
    with pytest.raises(GLMError, match="neither a text id"):
        tiny.decode([tiny.vocab_size])
    with pytest.raises(GLMError, match="no icetk model"):
        IceTokenizer(tmp_path)
    with pytest.raises(GLMError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(GLMError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "x", vocab_size=TINY_VOCAB)


def test_cli_train_and_encode(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in ALL_STRINGS * 10))
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(corpus),
                "--out",
                str(out),
                "--vocab-size",
                str(TINY_VOCAB),
                "--character-coverage",
                "1.0",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    tokenizer = load_tokenizer(out)
    capsys.readouterr()
    assert main(["tokenizer", "encode", str(out), "--prompt", "x [MASK] y"]) == 0
    printed = [int(i) for i in capsys.readouterr().out.split()]
    assert printed == tokenizer.encode_prompt("x [MASK] y")
    assert tokenizer.specials.mask in printed
    assert main(["tokenizer", "train", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2


def test_byte_lengths_sum_to_the_utf8_length_of_the_text(tiny):
    lengths = tiny.byte_lengths()
    rng = random.Random(1)
    texts = ALL_STRINGS + [random_text(rng, rng.randrange(1, 60)) for _ in range(100)]
    for text, ids in zip(texts, tiny.encode_batch(texts)):
        assert sum(lengths[i] for i in ids) == len(text.encode())
    specials = tiny.specials
    assert [lengths[t] for t in (specials.gmask, specials.sop, specials.eos, specials.pad)] == [0, 0, 0, 0]


def test_whitespace_ids_are_the_ids_of_whitespace_only_text(tiny):
    found = set(tiny.whitespace_ids())
    assert found and all(tiny.decode([i]).isspace() for i in found)
    for text in (" ", "\n", "\t", "   "):  # each encodes to whitespace-only ids only
        assert set(tiny.encode(text)) <= found, text
    words = {i for text in ("hello world", "中文", "a\nb") for i in tiny.encode(text) if not tiny.decode([i]).isspace()}
    assert not words & found
    specials = tiny.specials
    assert not {specials.mask, specials.gmask, specials.sop, specials.eop, specials.pad} & found
