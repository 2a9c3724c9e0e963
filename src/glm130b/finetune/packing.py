"""Records as GLM training rows, packed: each record is one `blank_segment` of the objective
(`prompt [gMASK] <sop> target` or the prompt's own [MASK], loss on the target and its <eop>), built
from the same context ids and positions as generation builds (glm130b.generate.prompts), so the
model is trained on exactly what it will later be asked. Segments are packed several to a sequence
with the objective's compact masks (block-diagonal attention, positions restarting per segment).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from glm130b.core.config_io import check_field, check_positive_int
from glm130b.core.errors import InputError
from glm130b.finetune.records import Record, RecordError
from glm130b.generate.inputs import mask_position
from glm130b.generate.prompts import parse_prompt
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.sampler import collate
from glm130b.objective.samples import Sample, blank_segment, concat_segments


def encode_record(record: Record, tokenizer, sequence_length: int) -> Sample:
    """One record as a segment; a record that cannot be one is a RecordError naming its line."""
    where = record.where
    try:
        prompt = parse_prompt(record.prompt, tokenizer)
    except InputError as err:
        raise RecordError(f"{where}: {err}") from None
    if len(prompt.markers) > 1:
        raise RecordError(
            f"{where}: the prompt holds {len(prompt.markers)} mask markers; a record fills one "
            "blank: write one [MASK], or none (then [gMASK] is appended)"
        )
    context, specials = prompt.context, tokenizer.specials
    mask_index, is_gmask = mask_position(context, specials)
    if is_gmask and mask_index != len(context) - 1:
        raise RecordError(
            f"{where}: [gMASK] continues the text, so it must end the prompt; write [MASK] for a blank inside the text"
        )
    target = tokenizer.encode(record.target)
    length = len(context) + 1 + len(target)  # <sop> in front of the target
    if length > sequence_length:
        raise RecordError(
            f"{where}: the record takes {length} tokens (prompt {len(context)}, <sop>, target "
            f"{len(target)}), more than the sequence length {sequence_length}; shorten it or "
            "raise sequence_length"
        )
    return blank_segment(np.asarray(context), mask_index, np.asarray(target), specials, counting=is_gmask)


def encode_records(records: Sequence[Record], tokenizer, sequence_length: int) -> list[Sample]:
    return [encode_record(r, tokenizer, sequence_length) for r in records]


def pack(segments: Sequence[Sample], sequence_length: int) -> list[Sample]:
    """Best-fit decreasing: longest segment first, each into the fullest sequence it still fits.
    [gMASK] and [MASK] segments go to separate sequences, as 1-D positions follow one rule per
    sequence (Sample.counting). Deterministic in the order of `segments`."""
    packed = []
    for counting in (False, True):
        group = sorted((s for s in segments if s.counting == counting), key=len, reverse=True)
        bins: list[list[Sample]] = []
        free: list[tuple[int, int]] = []  # (room left, bin), ascending
        for segment in group:
            at = bisect.bisect_left(free, (len(segment), -1))  # the least room that still fits
            if at == len(free):
                bins.append([segment])
                room, b = sequence_length - len(segment), len(bins) - 1
            else:
                room, b = free.pop(at)
                bins[b].append(segment)
                room -= len(segment)
            bisect.insort(free, (room, b))
        packed += [concat_segments(b) for b in bins]
    return packed


@lru_cache(maxsize=4)
def _epoch_order(seed: int, count: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,))).permutation(count)


class PackedDataset:
    """Packed sequences as the trainer's batch source: `micro_batch(index)` holds micro_batch_size
    sequences in a seeded order that is shuffled anew each epoch, a function of (seed, index) only,
    so a resumed run sees the same batches. Rows are padded to sequence_length."""

    def __init__(
        self,
        packs: Sequence[Sample],
        micro_batch_size: int,
        sequence_length: int,
        pad_id: int,
        position_encoding: str = "1d",
        seed: int = 0,
    ):
        check_positive_int("micro_batch_size", micro_batch_size)
        if not packs:
            raise RecordError("no sequences to train on: the data holds no records")
        self.packs, self.micro_batch_size, self.sequence_length = list(packs), micro_batch_size, sequence_length
        self.pad_id, self.position_encoding, self.seed = pad_id, position_encoding, seed

    def __len__(self) -> int:
        return len(self.packs)

    def _collate(self, rows: Sequence[Sample]) -> TrainingBatch:
        return collate(rows, self.sequence_length, self.pad_id, self.position_encoding)

    def micro_batch(self, index: int) -> TrainingBatch:
        check_field("micro-batch index", index, int, lambda v: v >= 0, "a non-negative integer")
        rows = []
        for j in range(index * self.micro_batch_size, (index + 1) * self.micro_batch_size):
            epoch, i = divmod(j, len(self.packs))
            rows.append(self.packs[_epoch_order(self.seed, len(self.packs), epoch)[i]])
        return self._collate(rows)

    def batches(self) -> list[TrainingBatch]:
        """Every sequence once, in order (validation)."""
        m = self.micro_batch_size
        return [self._collate(self.packs[i : i + m]) for i in range(0, len(self.packs), m)]
