"""Triton kernels for the quantized linear layer: dequantization fused into the product.

`_decode_kernel` (one activation row) is a bandwidth-bound matrix-vector product with split-K;
`_prefill_kernel` (two rows or more) a tiled tensor-core product dequantizing each weight tile in
registers. Both read the packed weight as int32 words and turn each value field into a float
without conversion instructions (docs/quantization.md, "How the kernels work").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm130b.quant.format import SUPPORTED_GROUP_SIZES, QuantizationError, QuantScheme

# fp32 1.0 (0x3F800000) with mantissa bit 22 set: xor-ing a value field placed at the top of the
# mantissa sets the exponent of 1.0 and flips the field's sign bit (two's complement -> offset binary).
ONE_POINT_FIVE_BITS = tl.constexpr(0x3FC00000)  # constexpr: a jit function may read it


@triton.jit
def _offset_float(words, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The BITS-bit field at bit SHIFT of each int32 word, as the fp32 value 1.5 + v / 2^BITS."""
    if SHIFT <= 23 - BITS:  # move the field to mantissa bits [23 - BITS, 23)
        moved = words << (23 - BITS - SHIFT)
    else:
        moved = words >> (SHIFT - (23 - BITS))
    bits = (moved & (((1 << BITS) - 1) << (23 - BITS))) ^ ONE_POINT_FIVE_BITS
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _field_shift(P: tl.constexpr, BITS: tl.constexpr):
    """Bit offset of the value at position P (= input column within the word) of a little-endian word:
    INT4 keeps the even column in the high nibble of each byte, INT8 one value per byte."""
    if BITS == 4:
        return 8 * (P // 2) + 4 * (1 - P % 2)
    return 8 * P


# ---------------------------------------------------------------------------------- decode (GEMV)
@triton.jit
def _decode_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    KW,
    stride_wn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    """out [N] = W x + b for ONE activation row x [K]. Every tensor is 2-D [BLOCK_N, BLOCK_KW] or a
    slice of it, so the words stay in the registers they were loaded into (no layout conversions)."""
    VALS: tl.constexpr = 32 // BITS  # values per int32 word
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_KW)
    kw_per_split = tl.cdiv(tl.cdiv(KW, BLOCK_KW), SPLIT_K) * BLOCK_KW
    kw_start = pid_k * kw_per_split
    kw_stop = tl.minimum(kw_start + kw_per_split, KW)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    for kw0 in range(kw_start, kw_stop, BLOCK_KW):
        wcol = kw0 + rw  # [BKW] word index in the row
        in_k = wcol < kw_stop
        words = tl.load(
            w_ptr + rn[:, None] * stride_wn + wcol[None, :], mask=(rn[:, None] < N) & in_k[None, :], other=0
        )  # [BN, BKW] int32
        fx = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)  # sum over the word of f * x
        xsum = tl.zeros((BLOCK_KW,), dtype=tl.float32)  # sum over the word of x
        for p in tl.static_range(VALS):
            xp = tl.load(x_ptr + wcol * VALS + p, mask=in_k, other=0.0).to(tl.float32)  # [BKW]
            fx += _offset_float(words, _field_shift(p, BITS), BITS) * xp[None, :]
            xsum += xp
        part = fx * (1 << BITS) - (1.5 * (1 << BITS)) * xsum[None, :]  # sum over the word of v * x
        if GROUP > 0:  # words never straddle groups: a group is >= 32 columns, a word <= 8
            part *= tl.load(
                s_ptr + rn[:, None] * (K // GROUP) + (wcol * VALS // GROUP)[None, :],
                mask=(rn[:, None] < N) & in_k[None, :],
                other=0.0,
            ).to(tl.float32)
        acc += part
    y = tl.sum(acc, axis=1)  # [BN]
    if GROUP == 0:
        y *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if HAS_BIAS:
        if pid_k == 0:  # one K-slice adds the bias
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)
    else:  # fp32 buffer zeroed by the caller
        tl.atomic_add(out_ptr + rn, y, mask=rn < N)


# For H100/H200 (132 SMs). Each thread should hold >= 32 words: the x loads, conversions and sums
# are then shared by enough weight values that the sm_90 SASS of the loop costs ~4.5-4.9
# instructions per INT4 value (5.5-5.9 per INT8 value), under the ~5.6 that one H200 can issue
# per value at 3000 GB/s of INT4. BLOCK_N <= 64 keeps >= 192 programs on a 12288-row layer, and
# BLOCK_N x BLOCK_KW x 4 bytes x resident programs covers DRAM latency.
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=warps, num_stages=stages)
    for bn, bkw, warps, stages in [
        (16, 64, 1, 3),
        (16, 64, 1, 4),
        (32, 32, 1, 4),
        (16, 128, 2, 3),
        (32, 64, 2, 3),
        (32, 64, 2, 4),
        (32, 128, 2, 3),
        (32, 128, 4, 3),
        (64, 64, 4, 3),
        (16, 256, 4, 3),
        (64, 128, 4, 2),
        (32, 256, 4, 2),
    ]
]
_decode_autotuned = triton.autotune(configs=_DECODE_CONFIGS, key=["N", "K", "BITS", "GROUP"])(_decode_kernel)
# Split-K launches (layers too small to fill the GPU) add into one zeroed buffer, which autotuning's
# repeated runs would corrupt; they take this fixed mid-size tile instead.
SPLIT_K_DECODE_CONFIG = {"BLOCK_N": 32, "BLOCK_KW": 64, "num_warps": 2}


# ---------------------------------------------------------------------------------- prefill (GEMM)
@triton.jit
def _prefill_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    KW,
    stride_xm,
    stride_wn,
    stride_om,
    M_BUCKET,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    VALS: tl.constexpr = 32 // BITS
    # Programs sweep GROUP_M row blocks per column block so that weight tiles are reused from L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kw0 in range(0, KW, BLOCK_KW):
        wcol = kw0 + rw
        in_k = wcol < KW
        w_mask = in_k[:, None] & (rn[None, :] < N)
        words = tl.load(w_ptr + rn[None, :] * stride_wn + wcol[:, None], mask=w_mask, other=0)  # [BKW, BN]
        if GROUP > 0:
            s = tl.load(
                s_ptr + rn[None, :] * (K // GROUP) + (wcol * VALS // GROUP)[:, None], mask=w_mask, other=0.0
            ).to(tl.float32)  # [BKW, BN]
        for p in tl.static_range(VALS):
            v = _offset_float(words, _field_shift(p, BITS), BITS) * (1 << BITS) - 1.5 * (1 << BITS)  # exact ints
            if GROUP > 0:
                v = v * s
            xp = tl.load(
                x_ptr + rm[:, None] * stride_xm + (wcol * VALS + p)[None, :],
                mask=(rm[:, None] < M) & in_k[None, :],
                other=0.0,
            )  # [BM, BKW]
            if FP32_INPUT:  # full fp32 products, not TF32: the layer must match its fp32 reference
                acc = tl.dot(xp, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(xp, v.to(xp.dtype), acc)
    if GROUP == 0:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


# Prefill lengths vary from call to call: the autotune key holds M rounded up to a power of 2
# (M_BUCKET), so each bucket is tuned once instead of every new prompt length.
# Standard tensor-core tile shapes for H100/H200, plus 16-row tiles (tl.dot's minimum) for batched
# decoding; BLOCK_KW 16 words = 128 INT4 or 64 INT8 columns.
_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
    for bm, bn, bkw, warps, stages in [
        (128, 128, 16, 8, 3),
        (128, 256, 16, 8, 3),
        (64, 128, 16, 4, 4),
        (128, 64, 16, 4, 4),
        (64, 64, 32, 4, 3),
        (128, 128, 32, 8, 2),
        (64, 256, 16, 8, 3),
        (32, 128, 32, 4, 4),
        (16, 64, 16, 4, 4),
        (16, 128, 16, 4, 3),
        (16, 128, 32, 4, 3),
        (16, 256, 16, 8, 3),
    ]
]
_prefill_autotuned = triton.autotune(configs=_PREFILL_CONFIGS, key=["M_BUCKET", "N", "K", "BITS", "GROUP"])(
    _prefill_kernel
)

# Fixed small tiles for the CPU interpreter (TRITON_INTERPRET=1), where autotuning is meaningless.
INTERPRETER_DECODE_CONFIG = {"BLOCK_N": 16, "BLOCK_KW": 16}
INTERPRETER_PREFILL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KW": 16, "GROUP_M": 2}


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def decode_split_k(out_features: int, in_features: int) -> int:
    """K-slices per row block: GLM-130B's layers (>= 12288 rows) fill the GPU with row blocks alone;
    a layer with few rows splits K so that ~8192 rows' worth of programs run, each slice still
    covering >= 1024 columns."""
    return max(1, min(16, 8192 // out_features, in_features // 1024))


def supports(scheme: QuantScheme, in_features: int) -> bool:
    """Whether the kernels take this layer: its packed rows must be whole int32 words, its groups (if
    any) of the sizes they were tuned for (a sharded scheme's wide groups use the tile path)."""
    return in_features % (32 // scheme.bits) == 0 and scheme.group_size in (None, *SUPPORTED_GROUP_SIZES)


def triton_quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    *,
    config: dict | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [..., in] @ dequantized(weight)^T + bias, fused. `config`/`split_k` pin the tiles (tests and
    the interpreter); by default GPU launches are autotuned and CPU (interpreted) ones use small tiles."""
    in_features = x.shape[-1]
    out_features = weight.shape[0]
    if not supports(scheme, in_features):
        raise QuantizationError(
            f"the Triton kernels need the input dimension ({in_features}) to be a multiple of "
            f"{32 // scheme.bits} for {scheme.name}; use the tiled path (glm130b.kernels.quantized_linear)"
        )
    x2 = x.reshape(-1, in_features).contiguous()
    M = x2.shape[0]
    words = weight.contiguous().view(torch.int32)  # [N, KW]
    scale = scale.contiguous()
    group = scheme.group_size or 0
    interpreted = x.device.type == "cpu"
    bias_arg = bias if bias is not None else scale  # unused pointer when HAS_BIAS is False
    common = dict(BITS=scheme.bits, GROUP=group, HAS_BIAS=bias is not None)
    if M == 1:
        split = split_k or decode_split_k(out_features, in_features)
        out = (
            torch.zeros(out_features, device=x.device, dtype=torch.float32)
            if split > 1
            else torch.empty(out_features, device=x.device, dtype=x.dtype)
        )
        meta = config or (INTERPRETER_DECODE_CONFIG if interpreted else SPLIT_K_DECODE_CONFIG if split > 1 else None)
        kernel = _decode_kernel if meta else _decode_autotuned
        grid = lambda m: (triton.cdiv(out_features, m["BLOCK_N"]), split)  # noqa: E731
        kernel[grid](
            x2,
            words,
            scale,
            bias_arg,
            out,
            out_features,
            in_features,
            words.shape[1],
            words.stride(0),
            SPLIT_K=split,
            **common,
            **(meta or {}),
        )
        y = out.to(x.dtype)
    else:
        y = torch.empty(M, out_features, device=x.device, dtype=x.dtype)
        meta = config or (INTERPRETER_PREFILL_CONFIG if interpreted else None)
        kernel = _prefill_kernel if meta else _prefill_autotuned
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(out_features, m["BLOCK_N"]),)  # noqa: E731
        kernel[grid](
            x2,
            words,
            scale,
            bias_arg,
            y,
            M,
            out_features,
            in_features,
            words.shape[1],
            x2.stride(0),
            words.stride(0),
            y.stride(0),
            _next_power_of_2(M),
            FP32_INPUT=x.dtype == torch.float32,
            **common,
            **(meta or {}),
        )
    return y.view(*x.shape[:-1], out_features)
