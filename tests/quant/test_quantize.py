"""Weight-only quantization: the official format bit for bit, error bounds, the module swap, the
streaming converter, quantized loading and the errors a user can hit."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.checkpoint.quantized import quantized_tensors
from glm130b.checkpoint.sources import open_model_directory
from glm130b.cli.commands import main
from glm130b.distributed.inference_plan import GIB, plan_inference
from glm130b.interop.convert import convert
from glm130b.quant.format import (
    QuantizationError,
    QuantScheme,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from glm130b.quant.linear import QUANTIZED_LINEARS, QuantizedLinear, quantize_model

SCHEMES = [QuantScheme(8), QuantScheme(4), QuantScheme(8, 32), QuantScheme(4, 64), QuantScheme(4, 128)]


# ---------------------------------------------------------------------------------- the official layout
def official_pack_bytes(q: np.ndarray) -> np.ndarray:
    """The official int4WeightCompression written with arithmetic instead of shifts: byte j of a row
    is 16 * (q[2j] mod 16) + (q[2j+1] mod 16), stored as an unsigned byte."""
    nibbles = np.mod(q.astype(np.int64), 16)
    return (16 * nibbles[:, 0::2] + nibbles[:, 1::2]).astype(np.uint8)


def official_unpack_bytes(b: np.ndarray) -> np.ndarray:
    """The official int4WeightExtraction: high nibble first, each read as a 4-bit two's complement."""
    u = b.astype(np.int64)
    high, low = u // 16, u % 16
    signed = lambda n: n - 16 * (n >= 8)  # noqa: E731
    out = np.empty((b.shape[0], 2 * b.shape[1]), dtype=np.int64)
    out[:, 0::2], out[:, 1::2] = signed(high), signed(low)
    return out


def test_int4_packing_is_bit_exact_with_the_official_layout():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(37, 64))
    packed = pack_int4(torch.from_numpy(q).to(torch.int8))
    assert packed.shape == (37, 32) and packed.dtype == torch.int8
    np.testing.assert_array_equal(packed.view(torch.uint8).numpy(), official_pack_bytes(q))
    every_byte = np.arange(256, dtype=np.uint8).reshape(8, 32)  # all 256 byte values
    np.testing.assert_array_equal(
        unpack_int4(torch.from_numpy(every_byte).view(torch.int8)).numpy(), official_unpack_bytes(every_byte)
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_row_wise_quantization_is_the_official_arithmetic(bits):
    # The official code on an fp16 weight: scale = (max|W_row| / qmax).half(); q = round(W / scale).
    w = (torch.randn(48, 96, generator=torch.Generator().manual_seed(bits)) * 0.02).half()
    qmax = 2 ** (bits - 1) - 1
    official_scale = (w.abs().max(dim=-1).values / qmax).half()
    official_q = torch.round(w / official_scale[:, None]).to(torch.int8)
    packed, scale = quantize_weight(w, QuantScheme(bits))
    assert torch.equal(scale, official_scale)
    if bits == 4:
        np.testing.assert_array_equal(packed.view(torch.uint8).numpy(), official_pack_bytes(official_q.numpy()))
    else:
        assert torch.equal(packed, official_q)


def official_row_wise(w16: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official arithmetic on fp16 weights: scale = (max|W_row| / qmax).half(); q = round(W / scale)."""
    scale = (w16.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    return torch.round(w16 / scale[:, None]).to(torch.int8), scale


@pytest.mark.parametrize("bits", [8, 4])
def test_official_bytes_need_an_fp16_source(bits):
    """docs/quantization.md: row-wise files hold the official bytes for fp16 sources only. From fp32
    or bf16 the scale and W / scale are computed in the source's precision, so some scales and
    values land one step away from the official result for the same weights cast to fp16."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    for source, exact in ((torch.float16, True), (torch.float32, False), (torch.bfloat16, False)):
        weights = w.to(source)
        official_q, official_scale = official_row_wise(weights.half(), bits)
        packed, scale = quantize_weight(weights, QuantScheme(bits))
        q = unpack_int4(packed) if bits == 4 else packed
        assert torch.equal(scale, official_scale) == exact, source
        assert torch.equal(q, official_q) == exact, source
        assert (q.int() - official_q.int()).abs().max() <= 1  # never more than one step


def test_the_documented_int4_memory_is_the_planners():
    """docs/quantization.md states the planner's INT4 figure for one GPU, batch 1, context 2048."""
    plan = plan_inference(GLMConfig.from_preset("glm-130b"), 1, bits=4)
    terms = (plan.weights, plan.kv_cache, plan.activations, plan.workspace, plan.runtime, plan.total)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "quantization.md").read_text().splitlines()
    header = doc.index("| weights | KV cache | activations | dequantization workspace | CUDA runtime | total |")
    stated = [float(cell.removesuffix(" GiB")) for cell in doc[header + 2].strip("| ").split(" | ")]
    assert stated == pytest.approx([x / GIB for x in terms], abs=0.05)  # as rounded in the text
    assert f"**{plan.total / GIB:.1f} GiB ({plan.total / 1e9:.1f} GB) per GPU**" in "\n".join(doc)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_error_is_at_most_half_a_step(scheme):
    out_features, in_features = 64, 256
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3] *= 100  # rows of very different magnitude: each row/group gets its own step
    packed, scale = quantize_weight(w, scheme)
    group = scheme.group_size or in_features
    assert packed.shape == (out_features, in_features * scheme.bits // 8)
    assert scale.shape == ((out_features,) if scheme.group_size is None else (out_features, in_features // group))
    step = scale.float().reshape(out_features, -1).repeat_interleave(group, dim=1)  # [out, in]
    # absmax maps to +-qmax; the fp16 rounding of the scale may move it a hair, never past qmax
    absmax = w.abs().reshape(out_features, -1, group).amax(-1)
    torch.testing.assert_close(scale.float().reshape(out_features, -1), absmax / scheme.qmax, rtol=2**-10, atol=0)
    error = (dequantize_weight(packed, scale, scheme) - w).abs()
    assert (error <= step * (0.5 + 1e-5)).all()
    q = dequantize_weight(packed, scale, scheme) / step
    assert q.abs().max() <= scheme.qmax + 1e-4


def test_zero_rows_stay_zero():
    w = torch.randn(4, 64)
    w[1] = 0
    for scheme in (QuantScheme(8), QuantScheme(4, 32)):
        packed, scale = quantize_weight(w, scheme)
        deq = dequantize_weight(packed, scale, scheme)
        assert torch.isfinite(deq).all() and (deq[1] == 0).all()


def test_bad_schemes_and_shapes():
    with pytest.raises(QuantizationError, match="odd input dimension 63"):
        quantize_weight(torch.randn(4, 63), QuantScheme(4))
    with pytest.raises(QuantizationError, match="group size 64 does not divide the input dimension 96"):
        quantize_weight(torch.randn(4, 96), QuantScheme(8, 64))
    with pytest.raises(QuantizationError, match="--bits 8 or --bits 4"):
        QuantScheme(3)
    with pytest.raises(QuantizationError, match="group size 48 is not supported"):
        QuantScheme(4, 48)
    with pytest.raises(QuantizationError, match="not finite"):
        quantize_weight(torch.tensor([[1.0, float("inf")]]), QuantScheme(8))


# ---------------------------------------------------------------------------------- the model
def tiny_model(seed=0, **overrides) -> GLM:
    torch.manual_seed(seed)
    config = GLMConfig.from_preset("glm-tiny", hidden_dropout=0.0, attention_dropout=0.0, **overrides)
    return GLM(config).eval()


def forward_inputs(batch=2, seq=12):
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(seq).expand(batch, seq)
    return ids, positions, torch.zeros(batch, 1, seq, seq, dtype=torch.bool)


def dequantized_copy(model: GLM, scheme: QuantScheme) -> GLM:
    """The fp32 model whose linear weights are replaced by their quantize-dequantize round trip."""
    copy = tiny_model()
    copy.load_state_dict(model.state_dict())
    for name, module in copy.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(QUANTIZED_LINEARS):
            module.weight.data = dequantize_weight(*quantize_weight(module.weight.data, scheme), scheme)
    return copy


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4), QuantScheme(4, 32)], ids=lambda s: s.name)
def test_quantized_model_logits(scheme):
    fp32 = tiny_model()
    quantized = quantize_model(tiny_model(), scheme)
    kinds = {type(m).__name__ for n, m in quantized.named_modules() if n.endswith(QUANTIZED_LINEARS)}
    assert kinds == {"QuantizedLinear"}
    assert quantized.transformer.word_embeddings.weight.dtype == torch.float32  # embedding untouched
    with torch.no_grad():
        logits = quantized(*forward_inputs())
        exact = dequantized_copy(fp32, scheme)(*forward_inputs())
        original = fp32(*forward_inputs())
    # The module swap computes exactly the dequantized model (fp32 rounding only).
    torch.testing.assert_close(logits, exact, atol=1e-4, rtol=1e-5)
    # Stated bound against the unquantized model: the relative RMS error of the logits is at most the
    # largest relative RMS error of a quantized weight matrix (DeepNorm's alpha-scaled residual
    # carries most of the signal, so each layer's error is diluted; measured margin ~5x).
    weight_errors = [
        (exact_w - w).norm() / w.norm()
        for exact_w, w in zip(
            (m.weight for n, m in dequantized_copy(fp32, scheme).named_modules() if n.endswith(QUANTIZED_LINEARS)),
            (m.weight for n, m in fp32.named_modules() if n.endswith(QUANTIZED_LINEARS)),
        )
    ]
    assert (logits - original).norm() / original.norm() < max(weight_errors)


def test_quantized_linear_is_a_drop_in_linear():
    linear = torch.nn.Linear(64, 24, bias=False)
    q = QuantizedLinear.from_linear(linear, QuantScheme(8))
    assert q.bias is None and q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float16
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), linear(x), atol=0.02, rtol=0.02)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.name)
def test_streaming_equals_quantizing_the_loaded_model(tmp_path, scheme):
    save_model(tiny_model(), tmp_path / "fp32")
    in_memory = quantize_model(load_model(tmp_path / "fp32"), scheme).state_dict()
    # blocks of 1000 bytes: many per tensor, and a partial last one
    small_blocks = dict(quantized_tensors(open_model_directory(tmp_path / "fp32"), scheme, block_bytes=1000))
    assert small_blocks.keys() == in_memory.keys()
    assert all(torch.equal(small_blocks[name], tensor) for name, tensor in in_memory.items())
    convert(tmp_path / "fp32", tmp_path / "q", scheme=scheme, progress=False)
    streamed = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert sorted(streamed) == sorted(in_memory)
    for name, tensor in in_memory.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name

    loaded = load_model(tmp_path / "q")  # checkpoint.load_model sees the scheme in the metadata
    assert isinstance(loaded.transformer.layers[1].mlp.dense_4h_to_h, QuantizedLinear)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(*forward_inputs()), quantize_model(tiny_model(), scheme)(*forward_inputs()))
    half = load_model(tmp_path / "q", dtype=torch.float16)
    block = half.transformer.layers[0].attention.query_key_value
    assert block.weight.dtype == torch.int8 and block.weight_scale.dtype == torch.float16
    assert block.bias.dtype == torch.float16 and half.transformer.word_embeddings.weight.dtype == torch.float16


def test_quantize_command_and_checkpoint_errors(tmp_path, capsys):
    save_model(tiny_model(), tmp_path / "fp32")
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "q4"), "--bits", "4", "--group-size", "32"]) == 0
    metadata = json.loads(load_metadata(tmp_path / "q4")["quantization"])
    assert (metadata["bits"], metadata["group_size"]) == (4, 32)
    # quantizing twice, odd widths, unknown schemes: a message, exit code 2, no traceback
    assert main(["quantize", str(tmp_path / "q4"), str(tmp_path / "again"), "--bits", "8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    save_model(tiny_model(inner_hidden_size=161), tmp_path / "odd")
    assert main(["quantize", str(tmp_path / "odd"), str(tmp_path / "odd4"), "--bits", "4"]) == 2
    assert "odd input dimension 161" in capsys.readouterr().err
    assert not (tmp_path / "odd4" / "model.safetensors").exists()  # refused before writing
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "g"), "--bits", "4", "--group-size", "96"]) == 2
    assert "group size 96 is not supported" in capsys.readouterr().err

    weights = tmp_path / "q4" / "model.safetensors"
    for record, message in [
        ({"method": "gptq", "bits": 4, "group_size": 128}, "unknown method 'gptq'"),
        ({"method": "weight-only-absmax-symmetric", "bits": 3, "group_size": None}, "cannot quantize to 3 bits"),
        ("not json", "unreadable quantization scheme"),
    ]:
        state = load_file(str(weights))
        save_file(
            state, str(weights), metadata={"quantization": record if isinstance(record, str) else json.dumps(record)}
        )
        with pytest.raises(QuantizationError, match=message):
            load_model(tmp_path / "q4")


def load_metadata(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return f.metadata()


# Quantizing in a fresh process: after a warm-up conversion of a tiny model (libraries loaded, code
# paths touched), the peak resident memory (VmHWM, reset via clear_refs) may grow by less than one
# layer's bytes while the model is many layers.
MEMORY_PROBE = textwrap.dedent("""
    import sys
    from glm130b.interop.convert import convert
    from glm130b.quant.format import QuantScheme
    def status_kib(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
    warm_source, source, destination, bits = sys.argv[1:]
    convert(warm_source, destination + "-warm", scheme=QuantScheme(int(bits)), progress=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = status_kib("VmRSS:")
    convert(source, destination, scheme=QuantScheme(int(bits)), progress=False)
    print(before, status_kib("VmHWM:"))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak")
def test_streaming_peak_memory_is_below_one_layer(tmp_path):
    from glm130b.checkpoint.model_dir import save_config
    from glm130b.checkpoint.safetensors import write_streaming

    # 5 layers of hidden 640 in fp32: 15.6 MiB a layer, 78 MiB of layers; written lazily from one
    # random block so the test itself stays small. Measured growth: ~8 MiB whatever the layer count
    # (blocks of checkpoint.sources.BLOCK_BYTES, their temporaries and one packed output tensor).
    config = GLMConfig(num_layers=5, hidden_size=640, num_attention_heads=8, vocab_size=512, inner_hidden_size=1280)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GLM(config).state_dict().items()}
    pattern = torch.randn(2**16)
    specs = [(name, torch.float32, shape) for name, shape in shapes.items()]
    tensors = (
        (
            name,
            pattern.repeat(-(-torch.Size(shape).numel() // pattern.numel()))[: torch.Size(shape).numel()].view(shape),
        )
        for name, shape in shapes.items()
    )
    (tmp_path / "big").mkdir()
    write_streaming(tmp_path / "big" / "model.safetensors", specs, tensors, {"format": "glm130b"})
    save_config(config, tmp_path / "big")
    layer_bytes = 4 * sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith("transformer.layers.0."))
    model_bytes = 4 * sum(torch.Size(s).numel() for s in shapes.values())
    assert model_bytes > 5 * layer_bytes
    save_model(tiny_model(), tmp_path / "tiny")
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "tiny"), str(tmp_path / "big"), str(tmp_path / "q"), "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after = map(int, run.stdout.split())
    growth = (after - before) * 1024
    assert growth < layer_bytes, f"peak grew {growth / 2**20:.0f} MiB; one layer is {layer_bytes / 2**20:.0f} MiB"


def test_quality_benchmark_runs_on_a_tiny_model(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "bench_quant_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quant_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    save_model(tiny_model(), tmp_path / "tiny")
    np.save(tmp_path / "valid.npy", np.random.default_rng(0).integers(0, 1000, size=600))
    table = bench.main([str(tmp_path / "tiny"), str(tmp_path / "valid.npy"), "--window", "32", "--windows", "6"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"fp32", "int8-row", "int4-row", "int4-group32"} <= set(rows)  # glm-tiny's 160-wide FFN: group 32
    # a random model on random ids: perplexity near the vocabulary size, each row a real number
    assert all(float(rows[name].split("|")[2]) > 100 for name in ("fp32", "int8-row", "int4-row", "int4-group32"))
