"""The GLM-130B pretraining objective (SPEC.md sections 5 and 10): `ObjectiveConfig`, and the
samples built from raw tokens, each a pure function of a numpy Generator and its raw material:
[gMASK] (a suffix generated after `[gMASK] <sop>`), [MASK] (Poisson spans, each replaced by one
[MASK] and appended as `<sop> span`), MIP (`prompt [MASK] <sop> target`, a `blank_segment`, the
segment of supervised fine-tuning too). A `Sample` keeps its
attention in compact form (segment ids, bidirectional prefix) and its positions as (anchor, block
offset). No target is ever truncated. The recipe and the choices made: docs/objective.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from glm130b.core.config_io import DictConfig, check_field, check_positive_int
from glm130b.core.errors import ConfigError, GLMError
from glm130b.tokenizer.specials import SpecialTokens

# Products such as 0.15 * 60 land a hair above or below the integer in binary floating point;
# rounding decisions move by this first so that 0.15 * 60 counts as 9.
FLOAT_SLACK = 1e-9


def _ceil(x: float) -> int:
    return math.ceil(x - FLOAT_SLACK)


def _floor(x: float) -> int:
    return math.floor(x + FLOAT_SLACK)


@dataclass
class ObjectiveConfig(DictConfig):
    """The sample mix and its lengths. Defaults: the GLM-130B recipe (SPEC.md section 10)."""

    config_label = "ObjectiveConfig"

    sequence_length: int = 2048
    # Raw tokens of a [gMASK] sample: the recipe draws 2000 for both kinds (4 x 500 for [MASK]);
    # the [gMASK] sample then holds 2000 + 1 tokens ([gMASK] and <sop> in, the last token out).
    gmask_raw_length: int = 2000
    # [MASK] sequences: this many block-diagonal segments of this length (4 x 512 = 2048).
    mask_segments: int = 4
    mask_segment_length: int = 512
    # MIP sequences: this many instruction pairs, each in a segment of sequence_length / mip_segments.
    mip_segments: int = 4
    gmask_share: float = 0.7  # of the self-supervised (non-MIP) sequences
    mip_share: float = 0.05  # of all sequences
    mask_ratio: float = 0.15  # fraction of each [MASK] raw chunk covered by spans
    poisson_lambda: float = 3.0
    # Span lengths are Poisson(lambda) restricted to 1..max_span_length (the GLM code's 1..39).
    max_span_length: int = 39
    # A [gMASK] target is a suffix of uniform length in [min, max] x gmask_raw_length.
    suffix_fraction_min: float = 0.2
    suffix_fraction_max: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def for_sequence_length(cls, sequence_length: int) -> ObjectiveConfig:
        """The recipe scaled to a shorter (or longer) sequence, keeping its proportions: [gMASK] raw
        length 2000/2048 of it, four [MASK] segments of a quarter each. MIP keeps segments of
        about 512 tokens (instruction prompts do not shrink with the model): L // 512 of them, at
        least one. The span cap is lowered where a segment is too short to be sure to place
        39-token spans (see max_feasible_span_length); Poisson(3) mass beyond ~20 is below 1e-10."""
        recipe = cls()
        check_field("sequence_length", sequence_length, int, expected="an integer")
        segment = sequence_length // recipe.mask_segments
        if max_feasible_span_length(segment, recipe.mask_ratio) < 1:
            raise ConfigError(
                f"sequence_length {sequence_length} gives [MASK] segments of {segment} tokens, "
                "too short to place spans at a 15 % mask ratio; use at least 32"
            )
        return cls(
            sequence_length=sequence_length,
            gmask_raw_length=sequence_length * recipe.gmask_raw_length // recipe.sequence_length,
            mask_segment_length=segment,
            mip_segments=max(1, sequence_length // (recipe.sequence_length // recipe.mip_segments)),
            max_span_length=min(recipe.max_span_length, max_feasible_span_length(segment, recipe.mask_ratio)),
        )

    # ------------------------------------------------------------------ derived values
    @property
    def mip_segment_length(self) -> int:
        return self.sequence_length // self.mip_segments

    @property
    def mask_window_length(self) -> int:
        """Raw tokens read for a [MASK] sequence: an upper bound, each segment uses fewer."""
        return self.mask_segments * self.mask_segment_length

    @property
    def max_spans_per_segment(self) -> int:
        """Each span covers at least one token and drawing stops by floor(ratio x segment) covered
        (one span at least)."""
        return max(1, _floor(self.mask_ratio * self.mask_segment_length))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in (
            "sequence_length",
            "gmask_raw_length",
            "mask_segments",
            "mask_segment_length",
            "mip_segments",
            "max_span_length",
        ):
            check_positive_int(name, getattr(self, name))
        if self.gmask_raw_length + 1 > self.sequence_length:
            raise ConfigError(
                f"gmask_raw_length {self.gmask_raw_length} + 1 ([gMASK] and <sop> in, the "
                f"last token out) exceeds sequence_length {self.sequence_length}; "
                f"lower gmask_raw_length to at most {self.sequence_length - 1}"
            )
        if self.mask_segments * self.mask_segment_length > self.sequence_length:
            raise ConfigError(
                f"{self.mask_segments} [MASK] segments of {self.mask_segment_length} tokens "
                f"exceed sequence_length {self.sequence_length}; use "
                f"ObjectiveConfig.for_sequence_length({self.sequence_length})"
            )
        if self.mip_segment_length < 2:
            raise ConfigError(
                f"MIP segments of {self.mip_segment_length} tokens cannot hold [MASK] and "
                f"<sop>; lower mip_segments ({self.mip_segments})"
            )
        for name in ("gmask_share", "mip_share"):
            check_field(name, getattr(self, name), float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        check_field(
            "mask_ratio",
            self.mask_ratio,
            float,
            lambda v: 0.0 < v < 0.25,
            "in (0, 0.25) so that spans, masks and <sop>s fit a segment",
        )
        check_field("poisson_lambda", self.poisson_lambda, float, lambda v: v > 0, "a positive number")
        for name in ("suffix_fraction_min", "suffix_fraction_max"):
            check_field(name, getattr(self, name), float)
        feasible = max_feasible_span_length(self.mask_segment_length, self.mask_ratio)
        if self.max_span_length > feasible:
            raise ConfigError(
                f"max_span_length {self.max_span_length} cannot always be placed in a "
                f"{self.mask_segment_length}-token segment at mask_ratio {self.mask_ratio}; "
                f"use at most {feasible} or longer segments"
            )
        if not 0.0 < self.suffix_fraction_min <= self.suffix_fraction_max <= 1.0:
            raise ConfigError(
                f"suffix fractions must satisfy 0 < min <= max <= 1, got "
                f"[{self.suffix_fraction_min}, {self.suffix_fraction_max}]"
            )


def max_feasible_span_length(segment_length: int, mask_ratio: float) -> int:
    """Longest span cap for which every draw fits: k spans of total C need C + (k - 1) separating
    tokens inside a raw chunk of segment - 2k. Before the last draw C < ratio x segment and
    k - 1 <= C, so C + 3k - 1 < 4 x ratio x segment + cap + 2, which must stay <= segment."""
    return math.floor(segment_length * (1 - 4 * mask_ratio) - 2 + FLOAT_SLACK)


# ---------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One sequence before padding: numpy arrays of equal length n <= sequence_length."""

    input_ids: np.ndarray  # [n] int64
    targets: np.ndarray  # [n] int64: the token each position predicts (itself where unscored)
    loss_mask: np.ndarray  # [n] bool
    segment_ids: np.ndarray  # [n] int64, 1, 2, ... (0 is kept for padding)
    in_prefix: np.ndarray  # [n] bool: the bidirectional context of its segment
    anchor: np.ndarray  # [n] int64: context: its index in the segment; span: its mask's index
    block_offset: np.ndarray  # [n] int64: 0 over the context, 1, 2, ... from <sop> within a span
    # 1-D positions count on past the mask ([gMASK]) instead of staying at it ([MASK]).
    counting: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    def position_ids(self, position_encoding: str) -> np.ndarray:
        """[n] for "1d" (GLM-130B), [2, n] for "2d" (ChatGLM: anchor row, block-offset row)."""
        if position_encoding == "2d":
            return np.stack([self.anchor, self.block_offset])
        return self.anchor + self.block_offset if self.counting else self.anchor


def _segment(
    context: np.ndarray,
    span_inputs: np.ndarray,
    span_targets: np.ndarray,
    span_anchor: np.ndarray,
    span_offset: np.ndarray,
    counting: bool = False,
) -> Sample:
    """One segment: a bidirectional context followed by its generated part."""
    n_ctx, n_gen = len(context), len(span_inputs)
    return Sample(
        input_ids=np.concatenate([context, span_inputs]),
        targets=np.concatenate([context, span_targets]),
        loss_mask=np.concatenate([np.zeros(n_ctx, bool), np.ones(n_gen, bool)]),
        segment_ids=np.ones(n_ctx + n_gen, np.int64),
        in_prefix=np.concatenate([np.ones(n_ctx, bool), np.zeros(n_gen, bool)]),
        anchor=np.concatenate([np.arange(n_ctx), span_anchor]),
        block_offset=np.concatenate([np.zeros(n_ctx, np.int64), span_offset]),
        counting=counting,
    )


def concat_segments(segments: Sequence[Sample]) -> Sample:
    """Segments side by side, numbered 1, 2, ... (block-diagonal attention, positions restart)."""
    fields_ = {
        f.name: np.concatenate([getattr(s, f.name) for s in segments])
        for f in dataclasses.fields(Sample)
        if f.name not in ("segment_ids", "counting")
    }
    ids = np.concatenate([np.full(len(s), i + 1, np.int64) for i, s in enumerate(segments)])
    return Sample(segment_ids=ids, counting=segments[0].counting, **fields_)


# ---------------------------------------------------------------------- [gMASK]
def gmask_sample(raw: np.ndarray, rng: np.random.Generator, config: ObjectiveConfig, specials: SpecialTokens) -> Sample:
    """`source [gMASK] <sop> target[:-1]` with targets `source [gMASK] target`, loss on the target.
    The target is the suffix of `raw`, its length uniform over the integers in
    [suffix_fraction_min, suffix_fraction_max] x len(raw)."""
    raw = np.asarray(raw, np.int64)
    n = len(raw)
    shortest = max(1, _ceil(config.suffix_fraction_min * n))
    longest = max(shortest, _floor(config.suffix_fraction_max * n))
    t = int(rng.integers(shortest, longest + 1))
    source, target = raw[: n - t], raw[n - t :]
    mask_index = n - t
    return _segment(
        context=np.append(source, specials.gmask),
        span_inputs=np.concatenate([[specials.sop], target[:-1]]),
        span_targets=target,
        span_anchor=np.full(t, mask_index),
        span_offset=np.arange(1, t + 1),
        counting=True,
    )


# ---------------------------------------------------------------------- [MASK]
@lru_cache(maxsize=16)
def span_length_cdf(poisson_lambda: float, max_span_length: int) -> np.ndarray:
    """CDF over span lengths 1..max_span_length of Poisson(lambda) restricted to that range."""
    k = np.arange(1, max_span_length + 1)
    log_pmf = k * math.log(poisson_lambda) - np.array([math.lgamma(i + 1) for i in k])
    pmf = np.exp(log_pmf - log_pmf.max())
    cdf = np.cumsum(pmf / pmf.sum())
    cdf[-1] = 1.0  # searchsorted must never run past the last length
    cdf.flags.writeable = False  # shared by every caller through the cache
    return cdf


def _starts_of(sizes: np.ndarray) -> np.ndarray:
    """Where each group begins when groups of these sizes are laid end to end."""
    return np.cumsum(sizes) - sizes


def _index_within(sizes: np.ndarray) -> np.ndarray:
    """0, 1, ..., size-1 for each group in turn: [2, 3] -> [0, 1, 0, 1, 2]."""
    return np.arange(int(sizes.sum())) - np.repeat(_starts_of(sizes), sizes)


def draw_span_lengths(rng: np.random.Generator, config: ObjectiveConfig) -> tuple[np.ndarray, np.ndarray]:
    """Span lengths of every segment, drawn until they cover mask_ratio of a raw chunk that then
    fits its segment exactly: with k spans the chunk has segment_length - 2k tokens (each span
    adds a [MASK] to the context and a <sop> to the generated part), so drawing stops at the first
    k with covered >= floor(ratio x (segment_length - 2k)), the official `while covered <
    int(ratio * len(chunk))` with the chunk length that fits.
    Returns the draws [segments, max_spans_per_segment] and the number used per segment; drawing
    a fixed number up front keeps the Generator's consumption independent of the outcome."""
    cdf = span_length_cdf(config.poisson_lambda, config.max_span_length)
    draws = rng.random((config.mask_segments, config.max_spans_per_segment))
    lengths = np.searchsorted(cdf, draws, side="right") + 1
    count = np.arange(1, lengths.shape[1] + 1)
    threshold = np.floor(config.mask_ratio * (config.mask_segment_length - 2 * count) + FLOAT_SLACK)
    # always reached: lengths are >= 1 and the threshold is at most max_spans_per_segment
    used = np.argmax(np.cumsum(lengths, axis=1) >= threshold, axis=1) + 1
    return lengths, used


def place_spans(
    rng: np.random.Generator, lengths: np.ndarray, segment: np.ndarray, chunk_length: np.ndarray
) -> np.ndarray:
    """Start of each span in its segment's chunk, spans given in text order and grouped by segment,
    with at least one unmasked token between neighbours: the GLM code's placement (free offsets
    drawn independently and sorted)."""
    spans_per_segment = np.bincount(segment, minlength=len(chunk_length))
    covered = np.bincount(segment, weights=lengths, minlength=len(chunk_length)).astype(np.int64)
    spare = chunk_length - covered - (spans_per_segment - 1)
    offsets = rng.integers(0, spare[segment] + 1)
    stride = chunk_length.max() + 1  # sorts the offsets within each segment in one call
    offsets = np.sort(offsets + segment * stride) - segment * stride
    before = _starts_of(lengths + 1)  # the spans and forced gaps before each span ...
    return offsets + before - before[_starts_of(spans_per_segment)][segment]  # ... in its segment


def mask_sample(raw: np.ndarray, rng: np.random.Generator, config: ObjectiveConfig, specials: SpecialTokens) -> Sample:
    """mask_segments segments of mask_segment_length tokens, cut from consecutive chunks of `raw`
    (at least mask_window_length tokens; each chunk is as long as its spans allow, so the tail of
    `raw` goes unused). In each, the spans (shuffled into a random text order) become one [MASK]
    each; then, in another random order, each span is appended as `<sop> span` with targets
    `span <eop>` at its mask's position. All segments are built at once (flat arrays of spans
    grouped by segment): a sample costs a few dozen numpy calls, not a few per token."""
    raw = np.asarray(raw, np.int64)
    if len(raw) < config.mask_window_length:
        raise GLMError(f"a [MASK] sample needs {config.mask_window_length} raw tokens, got {len(raw)}")
    S, G = config.mask_segment_length, config.mask_segments
    draws, spans_per_segment = draw_span_lengths(rng, config)
    # text order: a random permutation of each segment's used draws (the last draw is biased
    # long by the stopping rule); unused draws sort last and are dropped
    is_used = np.arange(draws.shape[1]) < spans_per_segment[:, None]
    text_order = np.argsort(np.where(is_used, rng.random(draws.shape), 2.0), axis=1)
    lengths = np.take_along_axis(draws, text_order, axis=1)[is_used]
    segment = np.repeat(np.arange(G), spans_per_segment)  # of each span
    chunk_length = S - 2 * spans_per_segment
    starts = place_spans(rng, lengths, segment, chunk_length) + _starts_of(chunk_length)[segment]

    text = raw[: int(chunk_length.sum())]
    inside = np.repeat(starts - _starts_of(lengths), lengths) + np.arange(int(lengths.sum()))
    keep = np.ones(len(text), bool)
    keep[inside] = False
    keep[starts] = True  # the first token of each span becomes its [MASK]
    shown = text.copy()
    shown[starts] = specials.mask
    covered = np.bincount(segment, weights=lengths, minlength=G).astype(np.int64)
    generated_length = covered + spans_per_segment  # <sop> + span each
    context_length = S - generated_length  # = chunk - covered + one [MASK] per span
    mask_index = (np.cumsum(keep) - 1)[starts] - _starts_of(context_length)[segment]

    # generated part: spans grouped by segment, in a random order within each
    order = np.lexsort((rng.random(len(lengths)), segment))
    block = lengths[order] + 1  # <sop> + span
    offset = _index_within(block)
    source = np.repeat(starts[order], block) + offset  # index in text of the token predicted here
    span_inputs = np.where(offset == 0, specials.sop, text[np.maximum(source - 1, 0)])
    span_targets = np.where(
        offset == np.repeat(lengths[order], block), specials.eop, text[np.minimum(source, len(text) - 1)]
    )

    segment_start = np.arange(G) * S
    in_context = np.repeat(segment_start, context_length) + _index_within(context_length)
    in_generated = np.repeat(segment_start + context_length, generated_length) + _index_within(generated_length)
    sample = Sample(
        input_ids=np.empty(G * S, np.int64),
        targets=np.empty(G * S, np.int64),
        loss_mask=np.ones(G * S, bool),
        segment_ids=np.repeat(np.arange(1, G + 1), S),
        in_prefix=np.zeros(G * S, bool),
        anchor=np.empty(G * S, np.int64),
        block_offset=np.zeros(G * S, np.int64),
    )
    sample.input_ids[in_context] = sample.targets[in_context] = shown[keep]
    sample.input_ids[in_generated], sample.targets[in_generated] = span_inputs, span_targets
    sample.loss_mask[in_context] = False
    sample.in_prefix[in_context] = True
    sample.anchor[in_context] = _index_within(context_length)
    sample.anchor[in_generated] = np.repeat(mask_index[order], block)
    sample.block_offset[in_generated] = offset + 1
    return sample


# ---------------------------------------------------------------------- MIP
class MIPPair(NamedTuple):
    prompt: np.ndarray  # token ids
    target: np.ndarray  # token ids


def mip_segment(pair: MIPPair, segment_length: int, specials: SpecialTokens) -> Sample:
    """`prompt [MASK] <sop> target` with targets `target <eop>` at the mask's position. A prompt too
    long for the segment loses tokens on the left (as evaluation prompts do); the target never."""
    prompt, target = np.asarray(pair.prompt, np.int64), np.asarray(pair.target, np.int64)
    room = segment_length - len(target) - 2  # [MASK] and <sop>
    if room < 0:
        raise GLMError(
            f"MIP target of {len(target)} tokens does not fit a {segment_length}-token segment "
            f"with [MASK], <sop> and <eop>; drop the pair or use fewer mip_segments"
        )
    prompt = prompt[len(prompt) - min(room, len(prompt)) :]
    return blank_segment(np.append(prompt, specials.mask), len(prompt), target, specials)


def blank_segment(
    context: np.ndarray, mask_index: int, target: np.ndarray, specials: SpecialTokens, counting: bool = False
) -> Sample:
    """`context <sop> target` with targets `target <eop>`: the blank at context[mask_index] filled
    by `target` (loss on the target and its <eop>), as generation sees it (glm130b.generate.inputs).
    The span sits at the mask's position, or with `counting` ([gMASK] ending the context) counts on."""
    context, target = np.asarray(context, np.int64), np.asarray(target, np.int64)
    n = len(target) + 1
    return _segment(
        context=context,
        span_inputs=np.concatenate([[specials.sop], target]),
        span_targets=np.append(target, specials.eop),
        span_anchor=np.full(n, mask_index),
        span_offset=np.arange(1, n + 1),
        counting=counting,
    )


def mip_sample(
    pairs: Sequence[MIPPair], rng: np.random.Generator, config: ObjectiveConfig, specials: SpecialTokens
) -> Sample:
    """mip_segments pairs drawn uniformly (with replacement), one per segment."""
    chosen = rng.integers(0, len(pairs), size=config.mip_segments)
    return concat_segments([mip_segment(pairs[i], config.mip_segment_length, specials) for i in chosen])


class TextEncoder(Protocol):
    """What loading MIP pairs needs of a tokenizer (glm130b.tokenizer.tokenizers.Tokenizer has it)."""

    def encode(self, text: str) -> list[int]: ...


def load_mip_pairs(path: str | Path, tokenizer: TextEncoder | None = None) -> list[MIPPair]:
    """Instruction pairs from JSON lines `{"prompt": ..., "target": ...}`. Each field is text
    (encoded with `tokenizer.encode`) or an already tokenised list of ids. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise GLMError(f"MIP file {path} does not exist")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GLMError(f"{path}:{number}: not valid JSON ({e.msg}); write one object per line") from e
        if not isinstance(record, dict) or not {"prompt", "target"} <= record.keys():
            raise GLMError(f"{path}:{number}: each line must be an object with 'prompt' and 'target' fields")
        pairs.append(
            MIPPair(*(_token_ids(record[f], tokenizer, f"{path}:{number}: {f}") for f in ("prompt", "target")))
        )
    return pairs


def _token_ids(value: str | Iterable[int], tokenizer: TextEncoder | None, where: str) -> np.ndarray:
    if isinstance(value, str):
        if tokenizer is None:
            raise GLMError(
                f"{where} is text but no tokenizer was given; pass one to load_mip_pairs or store token id lists"
            )
        return np.asarray(tokenizer.encode(value), np.int64)
    ids = list(value)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise GLMError(f"{where} must be text or a list of non-negative token ids")
    return np.asarray(ids, np.int64)
