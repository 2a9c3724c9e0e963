"""Shared test helpers: the oracle fixtures and the GLM config each one pins, paths, a free port."""

import hashlib
import random
import socket
import zlib
from pathlib import Path

import torch

from glm130b import GLM, GLMConfig
from glm130b.model.config import SHAPE_FIELDS
from glm130b.tokenizer.specials import SpecialTokens

FIXTURES = Path(__file__).parent / "fixtures"
# shared/ sits beside the repository (CI copies it next to its clone); tests that read real data skip without it.
SHARED = Path(__file__).resolve().parents[2] / "shared"
# The switches that distinguish each reference from the official GLM-130B class (the defaults).
ORACLE_SWITCHES = {
    "sat_basic_fp32": {},
    "sat_basic_fp16": {},
    "sat_padded_fp32": {},
    "sat04_glm130b_2d_fp32": dict(position_encoding="2d", rotary_dtype="fp32"),
    "chatglm6b_stock_fp32": dict(position_encoding="2d", ffn="gelu", tie_word_embeddings=False, deepnorm_num_layers=28),
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


# The long-context fixtures (sat_long_context_*.pt, positions up to 2047): vocabulary 256, specials
# at its top; eos and sMASK are ordinary tokens to the oracle and do not occur in its samples.
LONG_CONTEXT_TOKENS = SpecialTokens(mask=250, gmask=251, smask=249, sop=252, eop=253, eos=254, pad=0)


def canonical_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The weights shared/oracle/sat_oracle.py gives the official class: a draw seeded by the name."""
    g = torch.Generator().manual_seed(1234 + zlib.crc32(name.encode()))
    if "layernorm" in name:
        return (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if "word_embeddings" in name:
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / shape[-1] ** 0.5


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def long_context_model(name: str, **overrides) -> GLM:
    """The model of a long-context fixture, its weights rebuilt by name (the fixture stores only
    their hashes) in the fixture's dtype; checked to be the very bits the oracle ran."""
    fixture = load_fixture(name)
    dtype = torch.float16 if fixture["mode"] == "fp16" else torch.float32
    config = GLMConfig(**{k: fixture["config"][k] for k in SHAPE_FIELDS}, **overrides)
    model = GLM(config).eval().to(dtype)
    state = {k: canonical_value(k, tuple(v.shape)).to(dtype) for k, v in model.state_dict().items()}
    assert {k: tensor_sha256(v) for k, v in state.items()} == fixture["weight_sha256"]
    model.load_state_dict(state)
    return model


def valid_lengths(fixture: dict) -> torch.Tensor:
    ids = fixture["input_ids"]
    return fixture.get("lengths", torch.full((ids.shape[0],), ids.shape[1]))


# Ports the kernel hands out for outgoing connections (Linux's default range; read from /proc where
# it exists). A rendezvous port drawn from inside it can be taken between the draw and the listen
# by any connection a gloo group opens (CI saw EADDRINUSE on 39509), so draw below it.
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_DRAWN_PORT = 10000  # above the registered services most machines run


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now and that the kernel does not hand to
    outgoing connections (for a process group's rendezvous or a test server)."""
    first_ephemeral = int(EPHEMERAL_RANGE.read_text().split()[0]) if EPHEMERAL_RANGE.exists() else 32768
    draw = random.SystemRandom()  # not the seeded generator: parallel test workers must not draw alike
    for _ in range(100):
        port = draw.randrange(LOWEST_DRAWN_PORT, max(first_ephemeral, LOWEST_DRAWN_PORT + 1000))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port on loopback below the ephemeral range after 100 draws")
