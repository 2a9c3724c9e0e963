"""Quantized linear kernels against the dequantized reference (x @ dequantize(W)^T + b in float64).

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET,
set in conftest.py before any test module imports a kernel).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from glm130b.quant.format import QuantizationError, QuantScheme, dequantize_weight, quantize_weight  # noqa: E402
from glm130b.quant.kernels import dequant_tiles, quantized_linear  # noqa: E402
from glm130b.quant.kernels.triton_quant import supports, triton_quantized_linear  # noqa: E402

SCHEMES = [QuantScheme(4), QuantScheme(8), QuantScheme(4, 32), QuantScheme(8, 64), QuantScheme(4, 128)]
# Batch rows: 1 takes the decode (matrix-vector) kernel; 5 (batched decoding) and 24 (prefill) the
# tensor-core kernel, with one partial 16-row tile and with a full one plus a partial one.
ROWS = [1, 5, 24]
# fp32 activations: both kernels accumulate in fp32; the decode kernel's offset-float trick costs a
# few bits to cancellation (measured ~1e-6), the prefill products are plain fp32 (~1e-7).
FP32_RELATIVE_ERROR = 1e-5


def make_layer(scheme, out_features, in_features, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    packed, scale = quantize_weight(w, scheme)
    b = torch.randn(out_features, generator=g) if bias else None
    return packed, scale, b


def reference(x, packed, scale, bias, scheme):
    w = dequantize_weight(packed.cpu(), scale.cpu(), scheme, torch.float64)
    y = x.cpu().double() @ w.T
    return y + bias.cpu().double() if bias is not None else y


def relative_error(y, ref):
    return ((y.cpu().double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_triton_kernels_match_the_dequantized_reference(scheme, rows):
    # 100 output rows: not a multiple of any block, so the row masks are exercised; 256 inputs.
    packed, scale, bias = make_layer(scheme, 100, 256, seed=rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(100 + rows))
    y = triton_quantized_linear(x, packed, scale, bias, scheme)
    assert y.shape == (rows, 100) and y.dtype == torch.float32
    assert relative_error(y, reference(x, packed, scale, bias, scheme)) < FP32_RELATIVE_ERROR


@pytest.mark.parametrize("scheme", [QuantScheme(4), QuantScheme(8, 32)], ids=lambda s: s.name)
def test_decode_split_k_and_leading_dims(scheme):
    # Split-K accumulates K-slices atomically in fp32 and adds the bias once; a 3-D input keeps its shape.
    packed, scale, bias = make_layer(scheme, 40, 192, seed=7)
    x = torch.randn(1, 1, 192, generator=torch.Generator().manual_seed(8))
    for split in (1, 2, 3):
        y = triton_quantized_linear(x, packed, scale, bias, scheme, split_k=split)
        assert y.shape == (1, 1, 40)
        assert (
            relative_error(y.view(1, 40), reference(x.view(1, 192), packed, scale, bias, scheme)) < FP32_RELATIVE_ERROR
        )


def test_no_bias_and_input_tail():
    # K = 136 is not a multiple of the 16-word tile (128 INT4 columns): the K masks are exercised.
    scheme = QuantScheme(4)
    packed, scale, _ = make_layer(scheme, 64, 136, seed=3, bias=False)
    for rows in (1, 3):
        x = torch.randn(rows, 136, generator=torch.Generator().manual_seed(rows))
        y = triton_quantized_linear(x, packed, scale, None, scheme)
        assert relative_error(y, reference(x, packed, scale, None, scheme)) < FP32_RELATIVE_ERROR


def test_half_precision_activations():
    # fp16 in, fp16 out; error now dominated by fp16 rounding of the inputs/outputs (2^-11 ~ 5e-4).
    scheme = QuantScheme(8)
    packed, scale, bias = make_layer(scheme, 64, 128, seed=5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for rows in (1, 32):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).half()
        y = triton_quantized_linear(x.to(device), packed.to(device), scale.to(device), bias.to(device), scheme)
        assert y.dtype == torch.float16
        assert relative_error(y, reference(x, packed, scale, bias, scheme)) < 2e-3


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_tiled_cpu_path_matches_reference(scheme, monkeypatch):
    # A tile of 512 elements = 2 rows of 256: many tiles and a partial last one (101 rows).
    monkeypatch.setattr(dequant_tiles, "TILE_ELEMENTS", 512)
    packed, scale, bias = make_layer(scheme, 101, 256, seed=11)
    x = torch.randn(3, 4, 256, generator=torch.Generator().manual_seed(12))
    y = quantized_linear(x, packed, scale, bias, scheme)
    assert y.shape == (3, 4, 101)
    assert (
        relative_error(y.view(12, 101), reference(x.view(12, 256), packed, scale, bias, scheme)) < FP32_RELATIVE_ERROR
    )


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_backward_is_the_dequantized_product_and_keeps_no_float_weight(scheme, monkeypatch):
    """Adapters over a frozen quantized base train through this product: the input and bias get
    the gradients of x @ dequantize(W)^T + b, and autograd keeps only the packed weight and its
    scales, never a floating-point copy of W (that would cost the float model's memory)."""
    monkeypatch.setattr(dequant_tiles, "TILE_ELEMENTS", 512)  # several tiles
    packed, scale, bias = make_layer(scheme, 101, 256, seed=13)
    bias.requires_grad_(True)
    x = torch.randn(3, 4, 256, generator=torch.Generator().manual_seed(14), requires_grad=True)
    grad = torch.randn(3, 4, 101, generator=torch.Generator().manual_seed(15))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = quantized_linear(x, packed, scale, bias, scheme)
    y.backward(grad)
    assert all(not t.is_floating_point() or t.numel() <= scale.numel() for t in saved)
    w = dequantize_weight(packed, scale, scheme, torch.float64)
    assert relative_error(x.grad, grad.double() @ w) < FP32_RELATIVE_ERROR
    assert relative_error(bias.grad, grad.double().sum((0, 1))) < FP32_RELATIVE_ERROR
    with torch.no_grad():  # inference takes the plain path, no autograd node
        assert quantized_linear(x, packed, scale, bias, scheme).grad_fn is None


def test_kernels_refuse_rows_that_are_not_whole_words():
    scheme = QuantScheme(4)
    assert supports(scheme, 256) and not supports(scheme, 260)  # 260 INT4 columns = 32.5 words
    packed, scale, bias = make_layer(scheme, 8, 260, seed=1)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        triton_quantized_linear(torch.randn(1, 260), packed, scale, bias, scheme)


# ---------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "scheme", [QuantScheme(4), QuantScheme(8), QuantScheme(4, 128), QuantScheme(8, 128)], ids=lambda s: s.name
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_features", [2048, 12288])  # 2048 rows decode with split-K, 12288 without
def test_autotuned_kernels_on_gpu(scheme, dtype, out_features):
    # GLM-130B's input width; the reference runs in float64 on the GPU.
    in_features = 12288
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(out_features, in_features, device="cuda", generator=g)
    packed, scale = quantize_weight(w, scheme)
    bias = torch.randn(out_features, device="cuda", generator=g).to(dtype)
    w64 = dequantize_weight(packed, scale, scheme, torch.float64)
    for rows in (1, 4, 8, 200):
        x = torch.randn(rows, in_features, device="cuda", generator=g).to(dtype)
        y = quantized_linear(x, packed, scale, bias, scheme)
        ref = x.double() @ w64.T + bias.double()
        # bf16 outputs carry 8 significant bits (2^-8 ~ 4e-3); fp16 11.
        bound = 8e-3 if dtype == torch.bfloat16 else 2e-3
        assert relative_error(y, ref.cpu()) < bound


# ---------------------------------------------------------------------------------- compiled for sm_90
# The interpreter skips the compiler's checks (types, constexpr globals, layouts). Compiling the
# kernels ahead of time for an H100/H200 target needs no GPU, only the ptxas that ships with
# Triton; it runs in a child process because this one has chosen the interpreter.
COMPILE_PROBE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from glm130b.quant.kernels import triton_quant as tq

    def compile(fn, pointers, ints, constants, warps):
        signature = {**pointers, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constants}}
        aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in pointers}  # as a launch sees them
        source = ASTSource(fn, signature, constants, attrs=aligned)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})

    for bits, group, split in [(4, 0, 1), (8, 128, 2)]:
        out = "*fp32" if split > 1 else "*fp16"
        kernel = compile(tq._decode_kernel, dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", b_ptr="*fp16", out_ptr=out),
                         ["N", "K", "KW", "stride_wn"],
                         dict(BITS=bits, GROUP=group, HAS_BIAS=True, SPLIT_K=split, BLOCK_N=32, BLOCK_KW=64), 2)
        assert kernel.asm["cubin"]
    compile(tq._prefill_kernel, dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*fp16", b_ptr="*bf16", out_ptr="*bf16"),
            ["M", "N", "K", "KW", "stride_xm", "stride_wn", "stride_om", "M_BUCKET"],
            dict(BITS=4, GROUP=128, HAS_BIAS=True, FP32_INPUT=False, BLOCK_M=16, BLOCK_N=128, BLOCK_KW=16, GROUP_M=8), 4)
    print("compiled")
""")


def test_kernels_compile_for_sm90():
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_PROBE], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
