"""Shared test helpers: the oracle fixtures and the GLM config each one pins, paths, a free port."""

import socket
from pathlib import Path

import torch

from glm130b import GLM, GLMConfig
from glm130b.tokenizer.specials import SpecialTokens

FIXTURES = Path(__file__).parent / "fixtures"
# shared/ sits beside the repository (CI copies it next to its clone); tests that read real data skip without it.
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "inner_hidden_size",
                "max_sequence_length")
# The switches that distinguish each reference from the official GLM-130B class (the defaults).
ORACLE_SWITCHES = {
    "sat_basic_fp32": {},
    "sat_basic_fp16": {},
    "sat_padded_fp32": {},
    "sat04_glm130b_2d_fp32": dict(position_encoding="2d", rotary_dtype="fp32"),
    "chatglm6b_stock_fp32": dict(position_encoding="2d", ffn="gelu", tie_word_embeddings=False,
                                 deepnorm_num_layers=28),
}
# Token ids the oracle cases use (their vocabulary is 1000); eos and sMASK are unused there.
ORACLE_TOKENS = SpecialTokens(mask=990, gmask=991, smask=989, sop=992, eop=993, eos=994, pad=0)


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt")


def oracle_config(name: str, **overrides) -> GLMConfig:
    fixture = load_fixture(name)
    shape = {k: fixture["config"][k] for k in SHAPE_FIELDS}
    return GLMConfig(**shape, **{**ORACLE_SWITCHES[name], **overrides})


def oracle_model(name: str, **overrides) -> GLM:
    model = GLM(oracle_config(name, **overrides)).eval()
    model.load_state_dict(load_fixture(name)["state_dict"])
    return model


def valid_lengths(fixture: dict) -> torch.Tensor:
    ids = fixture["input_ids"]
    return fixture.get("lengths", torch.full((ids.shape[0],), ids.shape[1]))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
