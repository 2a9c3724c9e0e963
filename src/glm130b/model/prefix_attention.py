"""Prefix-LM attention kernels fed by the compact mask form (glm130b.model.masks.CompactMask).

One GLM segment's attention is exactly two dense-kernel problems with no masked work: prefix rows
over prefix keys (bidirectional) and suffix rows over all keys (causal, bottom-right aligned).
`PrefixLMPlan` turns a batch's compact form into those problems once per forward, shared by every
layer; its kernels (varlen, varlen_packed, flex, loop) are described in docs/attention.md. None of
them has attention dropout (GLMConfig refuses the combination).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from glm130b.core.errors import InputError
from glm130b.model.block_mask import flex_block_mask

KERNELS = ("varlen", "varlen_packed", "flex", "loop")
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _bottom_right_causal(lq: int, lk: int, device) -> torch.Tensor:
    """Bool [lq, lk], True = visible: row r sees keys up to lk - lq + r."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool) -> torch.Tensor:
    """What flash varlen attention computes, one SDPA per sequence: q [Tq, H, D], k/v [Tk, H, D]."""
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        if qs.stop == qs.start:
            continue
        if ks.stop == ks.start:  # no keys: flash writes zeros
            out.append(q.new_zeros(qs.stop - qs.start, *v.shape[1:]))
            continue
        qi, ki, vi = (t.transpose(0, 1) for t in (q[qs], k[ks], v[ks]))  # [H, len, D]
        mask = _bottom_right_causal(qi.shape[1], ki.shape[1], q.device) if causal else None
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(0, *q.shape[1:])


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn (flash, CUDA), causal bottom-right aligned."""
    from torch.nn.attention.varlen import varlen_attn  # deferred: absent before torch 2.9

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.10: causal is the window (-1, 0)
        extra = {"window_size": (-1, 0) if causal else (-1, -1)}
    else:  # torch 2.9 spelling
        extra = {"is_causal": causal}
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)


def varlen_available(device: torch.device) -> bool:
    """Whether torch has flash varlen attention for `device` (CUDA, torch >= 2.9)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PrefixLMPlan:
    """The attention problems of one batch: built once per forward from the compact form, used by
    every layer."""

    batch: int
    length: int
    segments: list[tuple[int, int, int, int]]  # (row, start s, prefix end p, end e), in row order
    segment_ids: torch.Tensor
    in_prefix: torch.Tensor
    kernel: str = "varlen"
    # "varlen": the two calls' sequences tiling all B*L rows, (cu_q, cu_k, max_q, max_k) each,
    # and a [B*L] 0/1 flag of the pad rows
    tiled_prefix: tuple = ()
    tiled_suffix: tuple = ()
    pad_flags: torch.Tensor | None = None
    # "varlen_packed": flat row indices (into B*L) gathered per call, and where each row's output
    # sits in cat(prefix outputs, suffix outputs, pad rows)
    packed: dict | None = None
    # "loop": the runs of rows (kind, length) tiling all B*L rows
    runs: list | None = None
    _block_mask: object = None

    @classmethod
    def build(
        cls,
        segment_ids: torch.Tensor,
        in_prefix: torch.Tensor,
        kernel: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> PrefixLMPlan:
        """segment_ids [B, L] (0 = pad), in_prefix [B, L] bool. Each segment must be one contiguous
        run whose prefix is a run at its start (every GLM objective is); `device` and `dtype`: where
        the attention runs and on what (default: where segment_ids is, bf16). Cost: a loop over the
        segments on the host (pass the compact form on the host to spare a device sync)."""
        device = torch.device(device) if device is not None else segment_ids.device
        kernel = resolve_kernel(kernel, device, dtype)
        seg, pre = segment_ids.cpu(), in_prefix.cpu()
        B, L = seg.shape
        prefix_count = torch.nn.functional.pad(pre.long().cumsum(1), (1, 0)).tolist()  # [B, L+1]
        segments = []
        for b in range(B):
            ids, counts = torch.unique_consecutive(seg[b], return_counts=True)
            seen, s = set(), 0
            for sid, n in zip(ids.tolist(), counts.tolist()):
                e = s + n
                if sid != 0:
                    if sid in seen:
                        raise InputError(
                            f"segment {sid} of row {b} is not contiguous; the prefix-LM kernels need "
                            "each segment as one run of tokens (use attention_backend sdpa)"
                        )
                    seen.add(sid)
                    p = s + prefix_count[b][e] - prefix_count[b][s]
                    if prefix_count[b][p] - prefix_count[b][s] != p - s:
                        raise InputError(
                            f"the prefix of segment {sid} in row {b} is not at the start of the "
                            "segment; the prefix-LM kernels need [prefix | causal part] "
                            "(use attention_backend sdpa)"
                        )
                    segments.append((b, s, p, e))
                s = e
        plan = cls(B, L, segments, segment_ids.to(device), in_prefix.to(device), kernel)
        if kernel == "varlen":
            tiled = []
            for cu_q, cu_k in _tiled_sequences(segments, B, L):
                tiled.append((_int32(cu_q, device), _int32(cu_k, device), _widest(cu_q), _widest(cu_k)))
            plan.tiled_prefix, plan.tiled_suffix = tiled
            plan.pad_flags = (plan.segment_ids == 0).flatten().float()
        elif kernel == "varlen_packed":
            plan.packed = _packed_indices(segments, seg, device)
        elif kernel == "flex":
            plan._block_mask = flex_block_mask(plan.segment_ids, plan.in_prefix)
        else:
            plan.runs = _loop_runs(segments, B, L)
        return plan

    # ------------------------------------------------------------------ attention
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen_fn: Callable | None = None
    ) -> torch.Tensor:
        """q, k, v [B, H, L, D] -> [B, H, L, D], softmax scale 1/sqrt(D). varlen_fn: the flash varlen
        call (default torch's; tests pass varlen_reference)."""
        if self.kernel == "varlen":
            return self._tiled(q, k, v, varlen_fn or torch_varlen)
        if self.kernel == "varlen_packed":
            return self._packed(q, k, v, varlen_fn or torch_varlen)
        if self.kernel == "flex":
            return _compiled_flex()(q, k, v, block_mask=self._block_mask)
        return self._loop(q, k, v)

    def _tiled(self, q, k, v, varlen_fn) -> torch.Tensor:
        B, H, L, D = q.shape
        qf, kf, vf = (t.transpose(1, 2).reshape(B * L, H, D) for t in (q, k, v))  # [B*L, H, D]
        out = varlen_fn(qf, kf, vf, *self.tiled_prefix, False)  # prefix rows; 0 elsewhere
        out = out + varlen_fn(qf, kf, vf, *self.tiled_suffix, True)  # suffix rows; 0 elsewhere
        out = out + vf * self.pad_flags.to(vf.dtype)[:, None, None]  # a pad row sees only itself
        return out.view(B, L, H, D).transpose(1, 2)

    def _packed(self, q, k, v, varlen_fn) -> torch.Tensor:
        B, H, L, D = q.shape
        ix = self.packed
        qf, kf, vf = (t.transpose(1, 2).reshape(B * L, H, D) for t in (q, k, v))  # [B*L, H, D]
        pieces = []
        if ix["prefix_rows"].numel():
            rows = ix["prefix_rows"]
            pieces.append(
                varlen_fn(
                    qf[rows],
                    kf[rows],
                    vf[rows],
                    ix["cu_prefix"],
                    ix["cu_prefix"],
                    ix["max_prefix"],
                    ix["max_prefix"],
                    False,
                )
            )
        if ix["suffix_rows"].numel():
            rows, keys = ix["suffix_rows"], ix["key_rows"]
            pieces.append(
                varlen_fn(
                    qf[rows], kf[keys], vf[keys], ix["cu_suffix"], ix["cu_keys"], ix["max_suffix"], ix["max_keys"], True
                )
            )
        pieces.append(vf[ix["pad_rows"]])  # a pad row sees only itself: its output is its value
        out = torch.cat(pieces)[ix["inverse"]]  # [B*L, H, D] back in row order
        return out.view(B, L, H, D).transpose(1, 2)

    def _loop(self, q, k, v) -> torch.Tensor:
        B, H, L, D = q.shape
        # One split per tensor into runs of rows (its backward is one cat), not a slice per problem:
        # each slice's backward would write a whole-size gradient.
        kinds, lengths = zip(*self.runs)
        qs, ks, vs = (t.transpose(1, 2).reshape(B * L, H, D).split(lengths) for t in (q, k, v))  # [n, H, D] each
        out = []
        for i, kind in enumerate(kinds):
            if kind == "pad":  # a pad row sees only itself: its output is its value
                out.append(vs[i])
            elif kind == "prefix":
                out.append(_sdpa_rows(qs[i], ks[i], vs[i]))
            else:  # "suffix" over its segment's prefix run (the run before, if any) and itself
                keys, values = (
                    torch.cat((t[i - 1], t[i])) if kind == "suffix after prefix" else t[i] for t in (ks, vs)
                )
                mask = _bottom_right_causal(lengths[i], keys.shape[0], q.device)
                out.append(_sdpa_rows(qs[i], keys, values, mask))
        return torch.cat(out).view(B, L, H, D).transpose(1, 2)


def _sdpa_rows(q, k, v, mask=None) -> torch.Tensor:
    """SDPA over rows [n, H, D] (one sequence) -> [n, H, D]."""
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, n, D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).squeeze(0).transpose(0, 1)


def _loop_runs(segments, B: int, L: int) -> list[tuple[str, int]]:
    """The "loop" kernel's runs of rows over all B*L, in order: (kind, length), kind "pad",
    "prefix", "suffix" (a segment without prefix) or "suffix after prefix"."""
    runs, cursor = [], 0
    for b, s, p, e in segments:
        s, p, e = b * L + s, b * L + p, b * L + e
        if s > cursor:
            runs.append(("pad", s - cursor))
        if p > s:
            runs.append(("prefix", p - s))
        if e > p:
            runs.append(("suffix after prefix" if p > s else "suffix", e - p))
        cursor = e
    if B * L > cursor:
        runs.append(("pad", B * L - cursor))
    return runs


def _int32(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def _widest(cu: list[int]) -> int:
    return max((b - a for a, b in zip(cu, cu[1:])), default=0)


def _packed_indices(segments, seg: torch.Tensor, device) -> dict:
    """Row indices and cu_seqlens of the "varlen_packed" backend."""
    B, L = seg.shape
    prefix, suffix, keys = [], [], []
    cu_p, cu_s, cu_k = [0], [0], [0]
    for b, s, p, e in segments:
        base = b * L
        if p > s:
            prefix.append(torch.arange(base + s, base + p))
            cu_p.append(cu_p[-1] + p - s)
        if e > p:
            suffix.append(torch.arange(base + p, base + e))
            keys.append(torch.arange(base + s, base + e))
            cu_s.append(cu_s[-1] + e - p)
            cu_k.append(cu_k[-1] + e - s)
    empty = torch.zeros(0, dtype=torch.long)
    prefix_rows = torch.cat(prefix) if prefix else empty
    suffix_rows = torch.cat(suffix) if suffix else empty
    key_rows = torch.cat(keys) if keys else empty
    pad_rows = (seg.flatten() == 0).nonzero().flatten()
    order = torch.cat((prefix_rows, suffix_rows, pad_rows))
    inverse = torch.empty(B * L, dtype=torch.long)
    inverse[order] = torch.arange(B * L)
    to = dict(device=device, non_blocking=True)
    return dict(
        prefix_rows=prefix_rows.to(**to),
        cu_prefix=_int32(cu_p, device),
        max_prefix=_widest(cu_p),
        suffix_rows=suffix_rows.to(**to),
        key_rows=key_rows.to(**to),
        cu_suffix=_int32(cu_s, device),
        cu_keys=_int32(cu_k, device),
        max_suffix=_widest(cu_s),
        max_keys=_widest(cu_k),
        pad_rows=pad_rows.to(**to),
        inverse=inverse.to(**to),
    )


def _tiled_sequences(segments, B: int, L: int) -> list[tuple[list[int], list[int]]]:
    """cu_seq_q / cu_seq_k of the "varlen" backend's two calls over all B*L rows.

    Prefix call (bidirectional): sequence q [s, p) / k [s, p) per segment; every other run of rows
    r becomes q r / k empty (zeros, no work) then q empty / k r, which keeps both cursors in step.
    Suffix call (causal, bottom-right): q [s, p) / k empty, then q [p, e) / k [s, e); pad runs as above.
    """
    prefix_q, prefix_k, suffix_q, suffix_k = [0], [0], [0], [0]

    def add(cq, ck, q_end, k_end):
        if q_end != cq[-1] or k_end != ck[-1]:
            cq.append(q_end)
            ck.append(k_end)

    def skip(cq, ck, start, end):
        if end > start:
            add(cq, ck, end, start)  # these queries, no keys
            add(cq, ck, end, end)  # no queries, these keys

    cursor = 0
    for b, s, p, e in segments:  # in row order, as build() found them
        s, p, e = b * L + s, b * L + p, b * L + e
        for cq, ck in ((prefix_q, prefix_k), (suffix_q, suffix_k)):
            skip(cq, ck, cursor, s)
        add(prefix_q, prefix_k, p, p)  # prefix rows over prefix keys
        skip(prefix_q, prefix_k, p, e)  # suffix rows: not this call's
        if p > s:
            add(suffix_q, suffix_k, p, s)  # prefix rows: not this call's (no keys)
        if e > p:
            add(suffix_q, suffix_k, e, e)  # suffix rows over the whole segment, causal
        else:
            add(suffix_q, suffix_k, e, e)  # (all prefix: the keys are skipped with no queries)
        cursor = e
    for cq, ck in ((prefix_q, prefix_k), (suffix_q, suffix_k)):
        skip(cq, ck, cursor, B * L)
    return [(prefix_q, prefix_k), (suffix_q, suffix_k)]


_FLEX = None  # flex_attention compiled once per process (eager FlexAttention materialises the scores)


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel `auto` stands for on `device` for q/k/v of `dtype` (flash varlen, which takes fp16
    and bf16 only; else FlexAttention on CUDA; else the SDPA loop); an explicit kernel that cannot
    run there is an error naming the fix."""
    flash = varlen_available(device) and dtype in FLASH_DTYPES
    if kernel == "auto":
        return "varlen" if flash else "flex" if device.type == "cuda" else "loop"
    if kernel not in KERNELS:
        raise InputError(f"prefix_kernel must be one of {', '.join(KERNELS)} or auto, got {kernel!r}")
    if kernel.startswith("varlen") and not flash:
        raise InputError(
            f"prefix_kernel {kernel} needs flash varlen attention (CUDA, torch >= 2.9, fp16 or bf16), "
            f"not available on {device} for {dtype}; use prefix_kernel auto, flex or loop"
        )
    return kernel


@torch.compiler.disable
def attend_prefix_lm(plan: PrefixLMPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """plan.attend outside any compiled graph: the plan's sizes change every batch (no recompiles),
    and the kernels are fused already (FlexAttention compiles its own)."""
    return plan.attend(q, k, v)
