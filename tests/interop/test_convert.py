"""`glm130b convert` between model directories and official tensor-parallel shards of any degree, checked
against the shards SwissArmyTransformer itself wrote and an independent statement of convert_tp.py's rule."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.cli.commands import main
from glm130b.core.errors import CheckpointError
from glm130b.interop.convert import convert
from tests.helpers import FIXTURES, load_fixture, oracle_model

OFFICIAL = FIXTURES / "official_tp2_fp32"


def shards(folder):
    iteration = (folder / "latest").read_text().strip()
    return [torch.load(p, weights_only=True)["module"] for p in sorted((folder / iteration).glob("mp_rank_*"))]


def convert_tp_rule(name: str, tensor: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """THUDM/GLM-130B tools/convert_tp.py, splitting a TP = 1 tensor, restated: dense and 4h_to_h weights
    by columns, other weights and biases of split layers by rows, the GeGLU input as
    [chunk rank; chunk tp + rank] of 2 tp chunks, LayerNorms and the remaining biases replicated."""
    sequential = (
        "input_layernorm",
        "post_attention_layernorm",
        "final_layernorm",
        "attention.dense.bias",
        "dense_4h_to_h.bias",
        "inv_freq",
    )
    if any(s in name for s in sequential):
        return tensor
    if "dense_h_to_4h" in name:
        chunks = torch.chunk(tensor, 2 * tp, dim=0)
        return torch.cat([chunks[rank], chunks[tp + rank]])
    dim = 1 if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else 0
    return torch.chunk(tensor, tp, dim=dim)[rank]


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_dir_to_official_reproduces_the_shards_sat_wrote(tmp_path, kind):
    convert(FIXTURES / f"official_tp2_{kind}", tmp_path / "dir", progress=False)
    assert main(["convert", str(tmp_path / "dir"), str(tmp_path / "tp2"), "--to", "official", "--tp", "2"]) == 0
    ours, theirs = shards(tmp_path / "tp2"), shards(FIXTURES / f"official_tp2_{kind}")
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.keys() == reference.keys()
        for name, tensor in reference.items():
            assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name
    config = json.loads((tmp_path / "tp2" / "model_config.json").read_text())
    assert config["model_parallel_size"] == 2 and config["num_layers"] == 2


@pytest.mark.parametrize("tp", [1, 4])
def test_other_degrees_follow_convert_tp_and_round_trip(tmp_path, tp):
    convert(OFFICIAL, tmp_path / f"tp{tp}", to="official", tp=tp, progress=False)
    merged = torch.load(OFFICIAL / "expected.pt")["state_dict"]
    for rank, module in enumerate(shards(tmp_path / f"tp{tp}")):
        for name, tensor in merged.items():
            assert torch.equal(module[name], convert_tp_rule(name, tensor, rank, tp)), (name, rank)
    convert(tmp_path / f"tp{tp}", tmp_path / "back", progress=False)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == merged.keys() and all(torch.equal(back[k], v) for k, v in merged.items())


def test_sharded_directory_loads_like_one_file(tmp_path):
    save_model(oracle_model("sat_basic_fp32"), tmp_path / "one")
    convert(tmp_path / "one", tmp_path / "many", max_shard_bytes=100_000, progress=False)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "many" / f).is_file() for f in files)
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "many")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    convert(
        tmp_path / "many",
        tmp_path / "q",
        scheme=__import__("glm130b.quant.format").quant.format.QuantScheme(8),
        progress=False,
    )  # a sharded source streams into quantization too
    assert load_model(tmp_path / "q").transformer.layers[0].mlp.dense_4h_to_h.weight.dtype == torch.int8


def test_destination_is_never_half_written_or_clobbered(tmp_path, capsys):
    save_model(oracle_model("sat_basic_fp32"), tmp_path / "m")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone's files")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "taken"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["config.json", "model.safetensors"]
    # a failure half way (here: a degree that does not divide the heads' rows) leaves nothing behind
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "bad"), "--to", "official", "--tp", "7"]) == 2
    assert "cannot split evenly" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_broken_inputs_are_one_line_naming_the_file(tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(OFFICIAL, mixed)
    module = shards(mixed)[1]
    del module["transformer.final_layernorm.bias"]
    torch.save({"module": module}, mixed / "49300" / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt holds other tensors"):
        convert(mixed, tmp_path / "out", progress=False)

    pickled = tmp_path / "pickled"
    shutil.copytree(OFFICIAL, pickled)
    torch.save({"module": shards(pickled)[0], "args": CustomObject()}, pickled / "49300" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="objects other than tensors.*weights_only=True"):
        convert(pickled, tmp_path / "out", progress=False)

    truncated = tmp_path / "truncated"
    shutil.copytree(OFFICIAL, truncated)
    shard = truncated / "49300" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt cannot be read .* truncated"):
        convert(truncated, tmp_path / "out", progress=False)

    save_model(oracle_model("sat_basic_fp32"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is truncated" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


class CustomObject:
    """Stands for the DeepSpeed config objects some .pt files pickle."""


def test_the_tokenizer_travels_with_the_weights(tmp_path):
    from glm130b.tokenizer.tokenizers import load_tokenizer, train_tokenizer

    save_model(oracle_model("sat_basic_fp32"), tmp_path / "m")
    text = "the quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" * 20
    tokenizer = train_tokenizer(
        [text], tmp_path / "m" / "tokenizer", vocab_size=300 + 8
    )  # 256 bytes + 3 controls + the characters; + 8 specials
    for to in ("dir", "hf"):
        convert(tmp_path / "m", tmp_path / to, to=to, progress=False)
        assert load_tokenizer(tmp_path / to / "tokenizer").fingerprint() == tokenizer.fingerprint()
    specials = json.loads((tmp_path / "hf" / "config.json").read_text())["special_tokens"]
    assert specials["gmask"] == tokenizer.specials.gmask  # the folder's own ids, not GLM-130B's
    suppressed = set(json.loads((tmp_path / "hf" / "generation_config.json").read_text())["suppress_tokens"])
    assert {tokenizer.specials.gmask, tokenizer.specials.sop} <= suppressed
    assert set(range(tokenizer.vocab_size, 1000)) <= suppressed  # embedding rows no token maps to


def test_official_compatible_scales_are_those_of_each_rank_quantized_after_splitting(tmp_path):
    """The official runtime splits a checkpoint over its ranks and quantizes each rank row-wise: a
    column-split linear then has one scale per row and rank. Written out here with the official
    split (convert_tp_rule) and the row-wise formula per piece."""
    from glm130b.quant.format import QuantScheme, quantize_weight

    model = oracle_model("sat_padded_fp32").half()
    save_model(model, tmp_path / "fp16")
    assert main(["quantize", str(tmp_path / "fp16"), str(tmp_path / "q"), "--bits", "4", "--official-tp", "2"]) == 0
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    weights = {k: v for k, v in model.state_dict().items()}
    for name in [
        n
        for n in weights
        if n.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight"))
    ]:
        pieces = [quantize_weight(convert_tp_rule(name, weights[name], rank, 2), QuantScheme(4)) for rank in range(2)]
        if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):  # split by input columns
            expected_q = torch.cat([q for q, _ in pieces], dim=1)
            expected_scale = torch.stack([s for _, s in pieces], dim=1)  # [out, ranks]
        else:  # split by rows: each rank's rows keep their own row-wise scales
            expected_q, expected_scale = quantize_weight(weights[name], QuantScheme(4))
        assert torch.equal(state[name], expected_q) and torch.equal(state[name + "_scale"], expected_scale), name
    quantized = load_model(tmp_path / "q", dtype=torch.float32)
    fixture = load_fixture("sat_padded_fp32")
    with torch.no_grad():
        logits = quantized(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    assert torch.isfinite(logits).all()


def test_another_layernorm_order_round_trips_as_a_directory_but_not_as_official_shards(tmp_path, capsys):
    config = oracle_model("sat_basic_fp32").config
    model = GLM(GLMConfig.from_dict({**config.to_dict(), "layernorm_order": "sandwich"}))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.layernorm_order == "sandwich"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "tp1"), "--to", "official"]) == 2
    assert "has layernorm_order 'sandwich'; the official format holds DeepNorm models only" in capsys.readouterr().err
