"""Official tensor-parallel checkpoints (written by SwissArmyTransformer 0.2.12 itself) merge into a
model directory that reproduces the TP = 1 reference weights and logits."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from glm130b.checkpoint.model_dir import load_model
from glm130b.checkpoint.safetensors import write_streaming
from glm130b.cli.commands import main
from glm130b.core.errors import CheckpointError
from glm130b.interop.convert import convert
from tests.helpers import FIXTURES


def expected(kind):
    return torch.load(FIXTURES / f"official_tp2_{kind}" / "expected.pt")


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_merged_weights_are_bit_identical_to_tp1(tmp_path, kind):
    convert(FIXTURES / f"official_tp2_{kind}", tmp_path / "m", progress=False)
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    reference = expected(kind)["state_dict"]
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor), name


def test_converted_model_gives_the_reference_logits(tmp_path):
    ref = expected("fp32")
    assert main(["convert-official", str(FIXTURES / "official_tp2_fp32"), str(tmp_path / "m")]) == 0
    model = load_model(tmp_path / "m")
    with torch.no_grad():
        logits = model(ref["input_ids"], ref["position_ids"], ref["attention_mask"])
    for b, n in enumerate(ref["lengths"].tolist()):
        torch.testing.assert_close(logits[b, :n], ref["logits"][b, :n], atol=1e-4, rtol=0)


def test_geglu_halves_are_not_plain_concatenation(tmp_path):
    """Plain concatenation of the dense_h_to_4h shards would interleave value and gate rows."""
    name = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    shards = [
        torch.load(p, mmap=True, weights_only=False)["module"][name]
        for p in sorted((FIXTURES / "official_tp2_fp32" / "49300").glob("mp_rank_*"))
    ]
    assert not torch.equal(torch.cat(shards), expected("fp32")["state_dict"][name])


def test_cast_while_converting(tmp_path):
    convert(FIXTURES / "official_tp2_fp32", tmp_path / "m", dtype=torch.bfloat16, progress=False)
    assert {t.dtype for t in load_file(str(tmp_path / "m" / "model.safetensors")).values()} == {torch.bfloat16}


def test_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="holds no checkpoint: no config.json .* and no 'latest'"):
        convert(tmp_path, tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURES / "official_tp2_fp32", broken)
    (broken / "49300" / "mp_rank_00_model_states.pt").unlink()
    assert main(["convert-official", str(broken), str(tmp_path / "out")]) == 2
    assert "some tensor-parallel shards are missing" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    shutil.copytree(FIXTURES / "official_tp2_fp32", wrong)
    (wrong / "model_config.json").write_text(
        (wrong / "model_config.json").read_text().replace('"num_layers": 2', '"num_layers": 3')
    )
    with pytest.raises(CheckpointError, match="does not match its model config"):
        convert(wrong, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_streaming_writer_refuses_out_of_order_tensors(tmp_path):
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(CheckpointError, match="does not match the header's next entry"):
        write_streaming(tmp_path / "x.safetensors", specs, [("b", torch.zeros(3))])
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    write_streaming(tmp_path / "x.safetensors", specs, [("a", torch.ones(2)), ("b", torch.arange(3.0))])
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["b"], torch.arange(3.0))
