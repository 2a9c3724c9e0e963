"""Records as training rows: each segment is what generation sees for the same prompt (ids,
positions, attention; glm130b.generate.inputs is the reference), the loss covers the target and
its <eop> only, packing keeps segments apart, and the batch source is deterministic per epoch."""

import numpy as np
import pytest
import torch

from glm130b.finetune.packing import PackedDataset, encode_record, encode_records, pack
from glm130b.finetune.records import Record, RecordError
from glm130b.generate.inputs import build_generation_batch
from glm130b.model.masks import dense_attention_mask
from tests.generate.helpers import CharTokenizer


@pytest.mark.parametrize("prompt", ["abc", "ab[MASK]h", "abc[gMASK]"])
@pytest.mark.parametrize("encoding", ["1d", "2d"])
def test_a_segment_is_the_generation_sequence_with_the_target_scored(prompt, encoding):
    tok = CharTokenizer()
    segment = encode_record(Record(prompt, "def", "f:1"), tok, 32)
    ids = segment.input_ids.tolist()
    reference = build_generation_batch([ids], tok.specials, encoding)
    sop = ids.index(tok.specials.sop)
    assert ids[sop + 1 :] == tok.encode("def")
    assert segment.targets[sop:].tolist() == tok.encode("def") + [tok.specials.eop]
    assert segment.loss_mask.tolist() == [False] * sop + [True] * 4
    assert np.array_equal(segment.position_ids(encoding), reference.position_ids[0].numpy())
    mask = dense_attention_mask(torch.from_numpy(segment.segment_ids)[None], torch.from_numpy(segment.in_prefix)[None])
    assert torch.equal(mask, reference.attention_mask)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a[MASK]b[MASK]", "holds 2 mask markers"),
        ("ab[gMASK]cd", "[gMASK] continues the text, so it must end the prompt"),
        ("a[xMASK]", "unknown mask marker [xMASK]"),
        ("abcdefgh" * 4, "the record takes 38 tokens (prompt 33, <sop>, target 4), more than the sequence length 32"),
    ],
)
def test_records_that_cannot_be_a_segment_name_their_line(prompt, message):
    with pytest.raises(RecordError) as err:
        encode_record(Record(prompt, "abcd", "data.jsonl:7"), CharTokenizer(), 32)
    assert str(err.value).startswith("data.jsonl:7: ") and message in str(err.value)


def test_packing_keeps_every_record_once_within_the_length_and_apart():
    tok = CharTokenizer()
    rng = np.random.default_rng(0)
    records = [
        Record(
            "".join(rng.choice(list("abcdefgh"), rng.integers(1, 12))) + ("[MASK]" if i % 3 else ""),
            "".join(rng.choice(list("abcdefgh"), rng.integers(1, 6))),
            f"f:{i}",
        )
        for i in range(60)
    ]
    segments = encode_records(records, tok, 24)
    assert {s.counting for s in segments} == {False, True}  # [gMASK] and [MASK] records
    kind = {s.input_ids.tobytes(): s.counting for s in segments}
    packs = pack(segments, 24)
    assert all(len(p) <= 24 for p in packs)
    # best-fit decreasing needs at most 11/9 of the optimum + 1 sequences per kind (Johnson 1973)
    fewest = sum(-(-sum(len(s) for s in segments if s.counting == c) // 24) for c in (False, True))
    assert len(packs) <= 11 / 9 * fewest + 2
    found = []
    for p in packs:
        parts = [p.input_ids[p.segment_ids == i].tobytes() for i in np.unique(p.segment_ids)]
        assert len({kind[x] for x in parts}) == 1 and p.counting == kind[parts[0]]  # one position rule
        found += parts
        ids = torch.from_numpy(p.segment_ids)[None]
        blocked = dense_attention_mask(ids, torch.from_numpy(p.in_prefix)[None])[0, 0]
        assert blocked[ids[0, :, None] != ids[0, None, :]].all()  # no token sees another record
    assert sorted(found) == sorted(kind) and len(found) == len(segments)


def test_batches_are_a_function_of_seed_and_index_and_each_epoch_is_a_permutation():
    tok = CharTokenizer()
    octal = ["".join("abcdefgh"[int(d)] for d in f"{i:o}") for i in range(40)]  # 40 different prompts
    packs = pack(encode_records([Record(w * (i % 3 + 1), "c", f"f:{i}") for i, w in enumerate(octal)], tok, 16), 16)
    n = len(packs)
    rows = PackedDataset(packs, 1, 16, tok.specials.pad, seed=3)
    seen = [rows.micro_batch(j).input_ids[0] for j in range(2 * n)]
    as_set = [{bytes(r.numpy().tobytes()) for r in seen[e * n : (e + 1) * n]} for e in (0, 1)]
    assert len(as_set[0]) == n and as_set[0] == as_set[1]  # every sequence once per epoch ...
    assert any(not torch.equal(a, b) for a, b in zip(seen[:n], seen[n:]))  # ... in a new order
    pairs = PackedDataset(packs, 2, 16, tok.specials.pad, seed=3)  # the same stream, two rows at a time
    assert all(torch.equal(pairs.micro_batch(i).input_ids, torch.stack(seen[2 * i : 2 * i + 2])) for i in range(n))
    other = PackedDataset(packs, 1, 16, tok.specials.pad, seed=4)
    assert any(not torch.equal(other.micro_batch(j).input_ids[0], seen[j]) for j in range(n))
