"""Quantized linear products over one GLM-130B layer: effective bandwidth of the fused kernels.

  python benchmarks/bench_quant_kernels.py                      # one GPU (the H200 of ANCHORS.md)
  python benchmarks/bench_quant_kernels.py --append             # ... and append the table to RESULTS.md
  python benchmarks/bench_quant_kernels.py --small --device cpu # smoke run: tiny shapes, Triton interpreter

For each batch size (default 1 and 8) the four weight shapes of one layer (qkv 36864x12288, dense
12288x12288, h_to_4h 65536x12288, 4h_to_h 12288x32768) run through every path, measured in the
same run: fp16 cuBLAS, the official dequantize-then-GEMM (INT4 row-wise, dequantization compiled),
gpt-fast-style INT8 (compiled `F.linear(x, w8.to(fp16)) * s`), tinygemm INT4 group-128
(`torch.ops.aten._weight_int4pack_mm`, where this torch has it) and the glm130b kernels (INT4/INT8,
row-wise/group-128). Effective GB/s = the bytes of the weight as that path stores it (packed values,
not scales) / time per layer. Correctness checks against a float64 reference come first; the
table prints last. With $OUT set, the raw figures go to $OUT/bench_quant_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GLM_130B_LAYER = [("qkv", 36864, 12288), ("dense", 12288, 12288), ("h_to_4h", 65536, 12288), ("4h_to_h", 12288, 32768)]
SMALL_LAYER = [("qkv", 192, 128), ("dense", 64, 128), ("h_to_4h", 320, 128), ("4h_to_h", 64, 256)]
TINYGEMM_GROUP = 128  # tinygemm's usual group size; the ANCHORS.md figure uses it
RESULTS = Path(__file__).parent / "RESULTS.md"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny shapes (for the CPU interpreter)")
    parser.add_argument("--rows", default="1,8", help="comma-separated batch rows (decode: <= 8)")
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from suite_summary import figure, write_summary  # noqa: E402

from glm130b.quant.format import QuantScheme, dequantize_weight, quantize_weight  # noqa: E402
from glm130b.quant.kernels.triton_quant import triton_quantized_linear  # noqa: E402

OUR_SCHEMES = [QuantScheme(4), QuantScheme(4, 128), QuantScheme(8), QuantScheme(8, 128)]


def bench(fn, device: str) -> float:
    """Median seconds per call: do_bench on a GPU; one timed call after a warm-up on the CPU
    (the interpreter: a smoke test of the script, its times mean nothing)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_ceiling(device: str) -> float:
    """Device-to-device copy GB/s (bytes read + written), the practical bandwidth ceiling."""
    n = 2**28 if device == "cuda" else 2**22
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / bench(lambda: dst.copy_(src), device) / 1e9


def compile_if_gpu(fn, device: str):
    return torch.compile(fn) if device == "cuda" else fn


def dequantize_int4_rows(packed, scale):
    """The official path's first step: the whole INT4 matrix to fp16 (then an ordinary GEMM)."""
    return dequantize_weight(packed, scale, QuantScheme(4), torch.float16)


def int8_gpt_fast(x, w8, scale):
    return F.linear(x, w8.to(x.dtype)) * scale


def tinygemm_weights(n: int, k: int, device: str):
    """Random tinygemm INT4 weights (values are irrelevant to speed), or None where this torch lacks it."""
    if device != "cuda" or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None
    try:
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        weight = torch.ops.aten._convert_weight_to_int4pack(packed, 8)  # 8 inner k-tiles: tinygemm's default
        scales_and_zeros = torch.rand(k // TINYGEMM_GROUP, n, 2, dtype=torch.bfloat16, device=device)
        torch.ops.aten._weight_int4pack_mm(
            torch.randn(1, k, dtype=torch.bfloat16, device=device), weight, TINYGEMM_GROUP, scales_and_zeros
        )
        return weight, scales_and_zeros
    except (RuntimeError, TypeError) as err:
        print(f"tinygemm unavailable: {err}", file=sys.stderr)
        return None


def relative_error(y, ref) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    device = ARGS.device
    shapes = SMALL_LAYER if ARGS.small else GLM_130B_LAYER
    rows_list = [int(r) for r in ARGS.rows.split(",")]
    dtype = torch.float16 if device == "cuda" else torch.float32  # the interpreter runs fp32 fastest
    torch.manual_seed(0)
    ceiling = copy_ceiling(device) if device == "cuda" else None
    dequant = compile_if_gpu(dequantize_int4_rows, device)
    gpt_fast = compile_if_gpu(int8_gpt_fast, device)
    times: dict[tuple[str, int], float] = {}
    nbytes: dict[str, int] = {}
    checks = []
    for name, n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        quantized = {s.name: quantize_weight(w, s) for s in OUR_SCHEMES}
        tiny = tinygemm_weights(n, k, device)
        paths = {"fp16 cuBLAS F.linear": (lambda x, w=w: F.linear(x, w), 2 * n * k)}
        p4, s4 = quantized["int4-row"]
        paths["official INT4 dequantize + GEMM"] = (
            lambda x, p4=p4, s4=s4: F.linear(x, dequant(p4, s4).to(x.dtype)),
            n * k // 2,
        )
        p8, s8 = quantized["int8-row"][0], quantized["int8-row"][1].to(dtype)
        paths["gpt-fast INT8 compiled"] = (lambda x, p8=p8, s8=s8: gpt_fast(x, p8, s8), n * k)
        if tiny is not None:
            paths["tinygemm INT4 group-128"] = (
                lambda x, tiny=tiny: torch.ops.aten._weight_int4pack_mm(
                    x.to(torch.bfloat16), tiny[0], TINYGEMM_GROUP, tiny[1]
                ),
                n * k // 2,
            )
        for scheme in OUR_SCHEMES:
            packed, scale = quantized[scheme.name]
            paths[f"glm130b {scheme.name}"] = (
                lambda x, packed=packed, scale=scale, scheme=scheme: triton_quantized_linear(
                    x, packed, scale, None, scheme
                ),
                packed.numel(),
            )
        for path, (_, size) in paths.items():
            nbytes[path] = nbytes.get(path, 0) + size
        for rows in rows_list:
            x = torch.randn(rows, k, device=device, dtype=dtype)
            for scheme in OUR_SCHEMES:  # correctness first, against float64
                packed, scale = quantized[scheme.name]
                ref = x.double() @ dequantize_weight(packed, scale, scheme, torch.float64).T
                err = relative_error(triton_quantized_linear(x, packed, scale, None, scheme), ref)
                checks.append({"shape": name, "rows": rows, "scheme": scheme.name, "relative_error": err})
                print(f"check {name:8s} rows {rows} {scheme.name:13s} max relative error {err:.2e}")
                if err > 1e-2:
                    raise SystemExit(f"{scheme.name} on {name} is wrong: relative error {err:.2e}")
                del ref
            for path, (fn, _) in paths.items():
                times[path, rows] = times.get((path, rows), 0.0) + bench(lambda fn=fn, x=x: fn(x), device)

    card = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"### Quantized linear kernels, one GLM-130B layer{' (small shapes)' if ARGS.small else ''}",
        "",
        f"{card}; torch {torch.__version__}; commit {commit}; "
        + (f"copy ceiling {ceiling:,.0f} GB/s (read + written); " if device == "cuda" else "")
        + "activations "
        + str(dtype).replace("torch.", ""),
        "",
    ]
    header = "| path | " + " | ".join(f"batch {r}: us / layer | GB/s" for r in rows_list) + " |"
    lines += [header, "|---|" + "---:|---:|" * len(rows_list)]
    for path in nbytes:
        cells = [f"{times[path, r] * 1e6:,.0f} | {nbytes[path] / times[path, r] / 1e9:,.0f}" for r in rows_list]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "GB/s over the weight bytes as each path stores them (fp16: 2 bytes, INT8: 1, INT4: 1/2 per "
        "weight; scales not counted).",
    ]
    table = "\n".join(lines)
    if os.environ.get("OUT"):
        record = {
            "card": card,
            "torch": torch.__version__,
            "commit": commit,
            "copy_ceiling_gbs": ceiling,
            "checks": checks,
            "times_s": {f"{p} | batch {r}": t for (p, r), t in times.items()},
            "bytes": nbytes,
        }
        Path(os.environ["OUT"], "bench_quant_kernels.json").write_text(json.dumps(record, indent=2))
    if 1 in rows_list:  # the suite's headline figures (benchmarks/gpu_suite.sh): batch 1, goal 3000 GB/s

        def gbs(path):
            return nbytes[path] / times[path, 1] / 1e9

        write_summary(
            "quant_kernels",
            [
                figure(
                    f"glm130b {name} linear, batch 1, one GLM-130B layer{' (small shapes)' if ARGS.small else ''}",
                    gbs(f"glm130b {name}"),
                    "GB/s",
                    3000.0,
                    baseline,
                    gbs(baseline),
                )
                for name, baseline in (
                    ("int4-row", "official INT4 dequantize + GEMM"),
                    ("int8-row", "gpt-fast INT8 compiled"),
                )
            ],
        )
    if ARGS.append:
        with RESULTS.open("a") as f:
            f.write("\n" + table + "\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
