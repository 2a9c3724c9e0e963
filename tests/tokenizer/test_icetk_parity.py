"""IceTokenizer against the official wrapper: icetk 0.0.7 under SwissArmyTransformer 0.2.12's
GLM-130B tokenizer layer (`_IceTokenizer`), SPEC.md sections 2 and 5.

The real ice_text.model is not available, so stand-in SentencePiece models are trained here and
placed where icetk looks for its model (`~/.icetk_models/ice_text.model`, with HOME pointed at a
temporary folder). The oracle runs in a subprocess (this file run as a script) because icetk
imports torchvision and PIL, SAT's tokenizer module imports transformers, and icetk's generated
protobuf code needs the pure-Python protobuf backend: those modules are stubbed there, never in
the test process. `requests` is stubbed too, so the oracle cannot download anything.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

STUBBED_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "PIL",
    "PIL.Image",
    "requests",
    "transformers",
)


def run_oracle(cases_file: str, out_file: str, *homes: str) -> None:
    """Official ids for each case and each home folder (holding .icetk_models/ice_text.model): plain
    text (newlines passed and mapped), prompts, decodes."""
    for name in STUBBED_MODULES:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms.functional"].pil_to_tensor = None
    sys.modules["PIL"].Image = sys.modules["PIL.Image"]
    sys.modules["transformers"].AutoTokenizer = None
    import icetk as icetk_package

    # SAT's package imports deepspeed; load just its GLM-130B tokenizer folder as a package.
    sat = Path(importlib.util.find_spec("SwissArmyTransformer").submodule_search_locations[0])
    folder = sat / "tokenization" / "icetk_glm_130B"
    spec = importlib.util.spec_from_file_location(
        "icetk_glm_130B", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["icetk_glm_130B"] = package
    spec.loader.exec_module(package)
    cases = json.loads(Path(cases_file).read_text())
    Path(out_file).write_text(
        json.dumps({home: oracle_outputs(icetk_package, package, home, cases) for home in homes}, ensure_ascii=False)
    )


def oracle_outputs(icetk_package, sat_package, home: str, cases: dict) -> dict:
    os.environ["HOME"] = home
    importlib.reload(icetk_package)  # its module-level IceTokenizer() reads ~/.icetk_models
    icetk = icetk_package.icetk
    tokenizer = sat_package._IceTokenizer()  # takes `from icetk import icetk`, the one just made

    def official_prompt(raw_text: str) -> list[int]:
        """GLM-130B's generate.py prompt rule, with the [sMASK]-aware pattern of its later version."""
        generation_mask = "[gMASK]"
        mask_pattern = r"\[[sg]?MASK\]"
        text_list = re.split(mask_pattern, raw_text)
        pattern_list = re.compile(mask_pattern).findall(raw_text)
        seq = []
        for pattern, sub_text in zip(pattern_list, text_list):
            seq.extend(tokenizer.tokenize(sub_text))
            seq.append(tokenizer.get_command(pattern))
        seq.extend(tokenizer.tokenize(text_list[-1]))
        if "MASK]" not in raw_text:
            seq += [tokenizer.get_command(generation_mask)]
            raw_text += " " + generation_mask
        if not raw_text.endswith("MASK]"):
            seq = seq + [tokenizer.get_command("eos")]
        return seq + [tokenizer.get_command("sop")]

    out = {
        "num_text_tokens": icetk.num_text_tokens,
        "vocab_size": tokenizer.vocab_size,
        "specials": tokenizer.special_tokens,
        "text": [tokenizer.tokenize(t) for t in cases["texts"]],
        "text_newline_mapped": [icetk.encode(t, ignore_linebreak=False) for t in cases["texts"]],
        "prompt": [official_prompt(t) for t in cases["prompts"]],
    }
    out["decoded"] = [tokenizer.detokenize(ids) for ids in out["text"] + out["text_newline_mapped"] + out["prompt"]]
    return out


if __name__ == "__main__":
    run_oracle(*sys.argv[1:])
    sys.exit(0)

# ---------------------------------------------------------------------------------------------

import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402

from glm130b.generate.inputs import generation_context  # noqa: E402
from glm130b.generate.prompts import parse_prompt  # noqa: E402
from glm130b.tokenizer.specials import GLM130B_TOKENS  # noqa: E402
from glm130b.tokenizer.tokenizers import IceTokenizer, load_tokenizer  # noqa: E402
from tests.helpers import FIXTURES  # noqa: E402

STRINGS = json.loads((FIXTURES / "tokenizer" / "strings.json").read_text())
TEXTS = [s for group, items in STRINGS.items() if group != "prompts" for s in items]
PROMPTS = STRINGS["prompts"]
# Training text for the stand-ins: a third of each group, so most test strings are unseen.
TRAINING_TEXT = [s for items in STRINGS.values() for s in items[::3]] * 20
# SAT renders a special as "[" + its table name + "]"; our names for the same ids.
OFFICIAL_RENDERING = {
    "[[MASK]]": "[MASK]",
    "[[gMASK]]": "[gMASK]",
    "[[sMASK]]": "[sMASK]",
    "[sop]": "<sop>",
    "[</s>]": "</s>",
}
STAND_INS = {
    # icetk's own layout: unk 0, bos 1, eos 2 (id 20002), pad 3, "<n>" at 4 (id 20004); NFKC and
    # whitespace collapsing (SentencePiece's defaults); unknown characters become unk.
    "icetk-like": dict(pad_id=3, user_defined_symbols=["<n>"]),
    # the same ids, text kept as written and unknown characters spelled in bytes.
    "byte-fallback": dict(
        pad_id=3,
        user_defined_symbols=["<n>"],
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    ),
}


def _oracle_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("icetk", "SwissArmyTransformer", "google.protobuf"))


pytestmark = pytest.mark.skipif(
    not _oracle_available(),
    reason="the icetk oracle is not installed: run `make install` (icetk 0.0.7 and "
    "SwissArmyTransformer 0.2.12 with --no-deps, protobuf)",
)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> dict:
    """Stand-in name -> (its home folder, the official outputs); one oracle process for all."""
    root = tmp_path_factory.mktemp("icetk")
    homes = {}
    for name, options in STAND_INS.items():
        homes[name] = root / name
        folder = homes[name] / ".icetk_models"
        folder.mkdir(parents=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TRAINING_TEXT),
            model_prefix=str(folder / "ice_text"),
            model_type="unigram",
            vocab_size=400,
            hard_vocab_limit=False,
            character_coverage=1.0,
            minloglevel=2,
            num_threads=1,
            **options,
        )
    cases, out = root / "cases.json", root / "oracle.json"
    cases.write_text(json.dumps({"texts": TEXTS, "prompts": PROMPTS}, ensure_ascii=False))
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    done = subprocess.run(
        [sys.executable, __file__, str(cases), str(out), *map(str, homes.values())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads(out.read_text())
    return {name: (home, outputs[str(home)]) for name, home in homes.items()}


@pytest.fixture(params=sorted(STAND_INS))
def stand_in(request, oracle):
    """(the model folder where icetk looked, the official outputs)."""
    home, official = oracle[request.param]
    return home / ".icetk_models", official


def test_layout_matches_official(stand_in):
    folder, official = stand_in
    tok = IceTokenizer(folder)
    assert official["specials"] == {
        "[MASK]": tok.specials.mask,
        "[gMASK]": tok.specials.gmask,
        "[sMASK]": tok.specials.smask,
        "eod": 150003,
        "sop": tok.specials.sop,
        "eop": tok.specials.eop,
        "ENC": 150006,
        "dBLOCK": 150007,
        "eos": tok.specials.eos,
    }
    assert tok.specials == GLM130B_TOKENS
    # SAT's own vocab_size (150009) also counts eos, which sits among the text ids.
    assert tok.vocab_size == max(official["specials"].values()) + 1 == official["vocab_size"] - 1
    assert tok.num_pieces == official["num_text_tokens"]


@pytest.mark.parametrize("newline", ["pass", "<n>"])
def test_text_ids_match_official(stand_in, newline):
    folder, official = stand_in
    tok = IceTokenizer(folder, newline=newline)
    expected = official["text" if newline == "pass" else "text_newline_mapped"]
    assert tok.encode_batch(TEXTS) == expected
    assert [tok.encode(t) for t in TEXTS] == expected


def test_newline_mapping_uses_n_piece(stand_in):
    folder, _ = stand_in
    ids = IceTokenizer(folder, newline="<n>").encode("a\nb")
    assert 20004 in ids  # "<n>" is piece 4 in both stand-ins, as in ice_text.model


@pytest.mark.filterwarnings("ignore::UserWarning")  # marker look-alikes and [sMASK] are warned about
def test_prompt_ids_match_official(stand_in):
    """The text API's context (parse_prompt) + <sop>. The id-level rule (generation_context) cannot
    match on every prompt: the official rule decides eos on the text, and "Paris is the [MASK] "
    ends with a space that the icetk-like stand-in encodes to no id."""
    folder, official = stand_in
    tok = IceTokenizer(folder)
    ours = [parse_prompt(p, tok).context + [tok.specials.sop] for p in PROMPTS]
    assert ours == official["prompt"]
    by_ids = [generation_context(tok.encode_prompt(p), tok.specials, default_mask=tok.specials.gmask) for p in PROMPTS]
    assert [p for p, a, b in zip(PROMPTS, by_ids, ours) if a != b] in (
        [],
        ["Paris is the [MASK] ", "a blank at the end [MASK]\n"],
    )


def test_decode_matches_official(stand_in):
    folder, official = stand_in
    tok = IceTokenizer(folder)
    sequences = official["text"] + official["text_newline_mapped"] + official["prompt"]
    for ids, text in zip(sequences, official["decoded"]):
        for theirs, name in OFFICIAL_RENDERING.items():
            text = text.replace(theirs, name)
        assert tok.decode(ids) == text


def test_load_and_save_keep_ids(stand_in, tmp_path):
    folder, official = stand_in
    assert load_tokenizer(folder / "ice_text.model").encode_batch(TEXTS) == official["text"]
    mapped = IceTokenizer(folder, newline="<n>")
    mapped.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.fingerprint() == mapped.fingerprint() != IceTokenizer(folder).fingerprint()
    assert reloaded.encode_batch(TEXTS) == official["text_newline_mapped"]
