"""Hugging Face interop: an exported folder loads through transformers' Auto classes (with glm130b
installed, and with trust_remote_code where it is not) and gives our logits; `generate` and PEFT's
LoRA work on it; ChatGLM-6B folders load into the chatglm-6b preset and reproduce its oracle."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.generate.decode import banned_tokens, generate_ids
from glm130b.generate.inputs import build_generation_batch
from glm130b.generate.strategies import Greedy
from glm130b.interop.convert import convert
from glm130b.model.config import SHAPE_FIELDS
from glm130b.tokenizer.specials import SpecialTokens
from tests.helpers import ORACLE_TOKENS, load_fixture, oracle_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The sat_basic oracle model as a model directory and as a Hugging Face folder."""
    root = tmp_path_factory.mktemp("hf")
    model = oracle_model("sat_basic_fp32")
    save_model(model, root / "dir")
    convert(root / "dir", root / "hf", to="hf", progress=False)
    # The oracle model has no tokenizer folder; its special ids are the oracle cases' (what a saved
    # tokenizer would have put in config.json).
    config = json.loads((root / "hf" / "config.json").read_text())
    config["special_tokens"] = dataclasses.asdict(ORACLE_TOKENS)
    (root / "hf" / "config.json").write_text(json.dumps(config))
    generation = {
        "eos_token_id": [ORACLE_TOKENS.eop, ORACLE_TOKENS.eos],
        "pad_token_id": ORACLE_TOKENS.pad,
        "suppress_tokens": banned_tokens(ORACLE_TOKENS, 1000),
    }
    (root / "hf" / "generation_config.json").write_text(json.dumps(generation))
    return root, model


def test_auto_classes_give_our_logits(exported):
    import glm130b.hf  # noqa: F401  (registers the Auto classes)

    root, ours = exported
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["model_type"] == "glm130b" and (root / "hf" / "modeling_glm130b.py").is_file()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    fixture = load_fixture("sat_basic_fp32")
    with torch.no_grad():
        expected = ours(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
        got = theirs(
            fixture["input_ids"], position_ids=fixture["position_ids"], attention_mask=fixture["attention_mask"]
        ).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, fixture["logits"], atol=1e-4, rtol=0)


def test_ids_alone_follow_the_glm_prompt_rule_and_generate_matches_ours(exported):
    import glm130b.hf  # noqa: F401

    root, ours = exported
    theirs = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    specials = SpecialTokens(**json.loads((root / "hf" / "config.json").read_text())["special_tokens"])
    context = [5, 17, 230, 44, specials.gmask, specials.sop]
    batch = build_generation_batch([context], specials, "1d", 128)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(torch.tensor([context])).logits,
            ours(batch.input_ids, batch.position_ids, batch.attention_mask),
            atol=1e-5,
            rtol=0,
        )
        out = theirs.generate(torch.tensor([context]), max_new_tokens=6, do_sample=False, use_cache=False)
    [expected] = generate_ids(ours, [context], specials, Greedy(), max_new_tokens=6)
    generated = [t for t in out[0, len(context) :].tolist() if t not in (specials.eop, specials.eos)]
    assert generated == expected


def test_trust_remote_code_without_glm130b_installed(exported, tmp_path):
    root, ours = exported
    script = f"""
import sys, torch
sys.modules["glm130b"] = None  # importing glm130b now fails: the folder's own code must suffice
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(root / "hf")!r}, trust_remote_code=True).eval()
fixture = torch.load({str(tmp_path / "inputs.pt")!r})
with torch.no_grad():
    logits = model(fixture["input_ids"], position_ids=fixture["position_ids"],
                   attention_mask=fixture["attention_mask"]).logits
torch.save(logits, {str(tmp_path / "logits.pt")!r})
"""
    fixture = load_fixture("sat_basic_fp32")
    torch.save({k: fixture[k] for k in ("input_ids", "position_ids", "attention_mask")}, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        expected = ours(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_peft_lora_wraps_the_model_and_trains_only_adapters(exported):
    peft = pytest.importorskip("peft")
    import glm130b.hf  # noqa: F401

    root, _ = exported
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "hf")
    ids = torch.tensor([[5, 17, 230, 44, ORACLE_TOKENS.gmask, ORACLE_TOKENS.sop, 9, 12]])
    with torch.no_grad():
        before = base(ids).logits
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query_key_value", "dense_h_to_4h"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA starts as the identity (B = 0)
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)


def chatglm_folder(directory, fixture) -> None:
    """A folder laid out as THUDM/chatglm-6b's: its config.json fields, two pytorch_model .bin shards
    and their index, ChatGLM's key names (with the rotary buffers its code registers)."""
    directory.mkdir()
    config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "position_encoding_2d": True,
        "mask_token_id": 990,
        "gmask_token_id": 991,
        "bos_token_id": 992,
        "eos_token_id": 993,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        **{k: fixture["config"][k] for k in (*SHAPE_FIELDS, "layernorm_epsilon")},
    }
    (directory / "config.json").write_text(json.dumps(config))
    names = list(fixture["state_dict"])
    halves = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        torch.save({k: fixture["state_dict"][k] for k in keys}, directory / file)
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_chatglm6b_folder_reproduces_its_oracle(tmp_path):
    fixture = load_fixture("chatglm6b_stock_fp32")
    chatglm_folder(tmp_path / "chatglm", fixture)
    convert(tmp_path / "chatglm", tmp_path / "dir", progress=False)
    model = load_model(tmp_path / "dir")
    config = model.config
    assert (config.position_encoding, config.ffn, config.tie_word_embeddings, config.deepnorm_num_layers) == (
        "2d",
        "gelu",
        False,
        28,
    )
    with torch.no_grad():
        logits = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    torch.testing.assert_close(logits, fixture["logits"], atol=1e-4, rtol=0)
