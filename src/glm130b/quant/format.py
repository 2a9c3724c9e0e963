"""The weight-only quantization number format (SPEC.md section 7): schemes, quantize, dequantize, INT4 packing.

A quantized weight W [out, in] is `weight` (int8; INT4 packs two values per byte along the input
dim, the EVEN column in the HIGH nibble, as the official layout) and `weight_scale` (fp16, one per
output row, or per group of input columns). Symmetric absmax, no zero point, no calibration; the
arithmetic follows the official code operation for operation (docs/quantization.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from glm130b.core.errors import GLMError

SUPPORTED_BITS = (4, 8)
# Group sizes offered: at 32 the fp16 scales cost 1/8 extra bytes over INT4 values, below that the
# scales start to dominate; 128 is what tinygemm and most INT4 releases use.
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# The one quantization method this format knows; a checkpoint recording any other is refused.
METHOD = "weight-only-absmax-symmetric"
METADATA_KEY = "quantization"
# Linears that tensor parallel splits by input columns (their partial products are summed over ranks).
INPUT_SPLIT_LINEARS = ("attention.dense", "mlp.dense_4h_to_h")


class QuantizationError(GLMError):
    """A weight, scheme or checkpoint that cannot be quantized or read as asked."""


@dataclass(frozen=True)
class QuantScheme:
    """`bits` 8 or 4; `group_size` None for one scale per output row, else 32, 64 or 128.

    `shards` N reproduces the official runtime, which quantizes each of N tensor-parallel ranks after
    loading: a linear split by input columns (INPUT_SPLIT_LINEARS) gets one scale per output row and
    shard, i.e. groups of in / N columns (`for_linear` gives that layer's scheme); the others row-wise."""

    bits: int
    group_size: int | None = None
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantizationError(f"cannot quantize to {self.bits} bits; choose --bits 8 or --bits 4")
        if self.shards is not None:
            if not isinstance(self.shards, int) or self.shards < 1:
                raise QuantizationError(f"--official-tp must be a positive number of ranks, got {self.shards!r}")
            return  # the groups of a sharded scheme follow each layer's width (for_linear)
        if self.group_size is not None and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise QuantizationError(
                f"group size {self.group_size} is not supported; choose one of "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))} or leave it out for row-wise scales"
            )

    @property
    def qmax(self) -> int:
        """Largest magnitude of a quantized value: 127 for INT8, 7 for INT4 (-8 is never produced)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        if self.shards is not None:
            return f"int{self.bits}-row-official-tp{self.shards}"
        return f"int{self.bits}-" + ("row" if self.group_size is None else f"group{self.group_size}")

    def for_linear(self, path: str, in_features: int) -> QuantScheme:
        """The scheme of the linear at `path` (e.g. `transformer.layers.3.attention.dense`)."""
        if self.shards is None or not path.endswith(INPUT_SPLIT_LINEARS):
            return self if self.shards is None else QuantScheme(self.bits, None, self.shards)
        if in_features % self.shards:
            raise QuantizationError(
                f"{path} has {in_features} input columns, which {self.shards} tensor-parallel "
                "ranks cannot split evenly; pick --official-tp dividing it"
            )
        return QuantScheme(self.bits, in_features // self.shards, self.shards)

    def check_shape(self, out_features: int, in_features: int, what: str = "weight") -> None:
        if self.bits == 4 and in_features % 2:
            raise QuantizationError(
                f"{what} has an odd input dimension {in_features}: INT4 packs two input "
                "columns per byte; use --bits 8 for this model"
            )
        if self.group_size is not None and in_features % self.group_size:
            raise QuantizationError(
                f"group size {self.group_size} does not divide the input dimension "
                f"{in_features} of {what}; pick a group size that divides it, or row-wise scales"
            )

    def packed_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features * self.bits // 8

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        if self.group_size is None:
            return (out_features,)
        return out_features, in_features // self.group_size

    # ------------------------------------------------------------------ checkpoint metadata
    def to_metadata(self) -> dict[str, str]:
        record = {"method": METHOD, "bits": self.bits, "group_size": self.group_size}
        if self.shards is not None:
            record["shards"] = self.shards
        return {METADATA_KEY: json.dumps(record)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, source: str = "checkpoint") -> QuantScheme | None:
        """The scheme recorded in safetensors metadata; None for an unquantized checkpoint."""
        if not metadata or METADATA_KEY not in metadata:
            return None
        try:
            record = json.loads(metadata[METADATA_KEY])
            method, bits, group_size = record["method"], record["bits"], record["group_size"]
        except (ValueError, KeyError, TypeError):
            raise QuantizationError(
                f"{source} records an unreadable quantization scheme {metadata[METADATA_KEY]!r}; "
                "re-create it with `glm130b quantize`"
            ) from None
        if method != METHOD:
            raise QuantizationError(
                f"{source} is quantized with unknown method {method!r}; this version reads only "
                f"{METHOD!r} (re-quantize the fp16 model with `glm130b quantize`)"
            )
        try:
            return cls(bits, group_size, record.get("shards"))
        except QuantizationError as err:
            raise QuantizationError(f"{source} records an unknown quantization scheme: {err}") from None


# ---------------------------------------------------------------------------------- INT4 packing
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> int8 [out, in / 2]: even column high nibble, odd column low."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4, sign-extending each nibble (int8 shifts are arithmetic)."""
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).view(packed.shape[0], 2 * packed.shape[1])


# ---------------------------------------------------------------------------------- quantize
def quantize_weight(
    weight: torch.Tensor, scheme: QuantScheme, what: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (packed int8 weight, fp16 scales) of `scheme`."""
    out_features, in_features = weight.shape
    scheme.check_shape(out_features, in_features, what)
    group = in_features if scheme.group_size is None else scheme.group_size
    groups = weight.reshape(out_features, in_features // group, group)  # [out, G, group]
    scale = (groups.abs().amax(dim=-1) / scheme.qmax).half()  # [out, G]
    if not torch.isfinite(scale).all():
        raise QuantizationError(
            f"{what} holds values that are not finite or exceed the fp16 range of the "
            "scales; check the checkpoint is not corrupted"
        )
    # An all-zero row (or group) has scale 0; the official code divides 0 by 0 there. Dividing by 1
    # instead gives the only right answer, q = 0, and leaves every other row untouched.
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(groups / divisor[..., None]).to(torch.int8).reshape(out_features, in_features)
    if scheme.bits == 4:
        q = pack_int4(q)
    return q, scale.reshape(scheme.scale_shape(out_features, in_features))


def unpack_weight(packed: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Packed int8 weight -> int8 values [out, in]."""
    return unpack_int4(packed) if scheme.bits == 4 else packed


def dequantize_weight(
    packed: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(packed weight, scales) -> W [out, in] in `dtype`: q * scale of its row or group."""
    q = unpack_weight(packed, scheme)
    out_features, in_features = q.shape
    group = in_features if scheme.group_size is None else scheme.group_size
    w = q.view(out_features, in_features // group, group).to(dtype) * scale.view(out_features, -1, 1).to(dtype)
    return w.view(out_features, in_features)
