"""The GLM pretraining objective (SPEC.md sections 5 and 10) checked by invariants over thousands
of samples: each row is taken apart by an independent parser (segments from segment ids, blocks
from <sop> tokens, masks from the token ids) that rebuilds the raw text and checks every
position, mask and loss rule; the mix statistics are compared with exact expectations."""

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from glm130b.core.errors import ConfigError, GLMError
from glm130b.model.block_mask import flex_block_mask
from glm130b.objective.sampler import GLMBatchSampler, collate
from glm130b.objective.samples import (
    MIPPair,
    ObjectiveConfig,
    gmask_sample,
    load_mip_pairs,
    mask_sample,
    mip_sample,
    mip_segment,
)
from glm130b.tokenizer.specials import SpecialTokens

SPECIALS = SpecialTokens(mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6, pad=0)
# Every corpus token is unique (source offset + its index in the source), so a rebuilt raw text
# must be a run of consecutive ids; MIP prompt and target ids live in ranges of their own.
SOURCE_OFFSETS = {"web": 10, "books": 10_000_000}
SOURCE_WEIGHTS = {"web": 0.75, "books": 0.25}
PROMPT_BASE, TARGET_BASE = 20_000_000, 30_000_000
SIGMAS = 5  # two-sided 5-sigma bounds: a false alarm has probability ~6e-7 per check


class FakeCorpus:
    """In-memory stand-in for glm130b.data's corpus (same duck-typed interface)."""

    def __init__(self, num_tokens=200_000):
        self.sources = list(SOURCE_OFFSETS)
        self.weights = dict(SOURCE_WEIGHTS)
        self._num_tokens = num_tokens

    def num_tokens(self, source):
        return self._num_tokens

    def window(self, source, start, length):
        assert 0 <= start and start + length <= self._num_tokens
        return np.arange(start, start + length) + SOURCE_OFFSETS[source]


def make_pairs(lengths):
    """Pairs with distinct prompt/target ranges: pair i's ids start at base + i * 10_000."""
    return [MIPPair(PROMPT_BASE + 10_000 * i + np.arange(p), TARGET_BASE + 10_000 * i + np.arange(t))
            for i, (p, t) in enumerate(lengths)]


# (600, 20): prompt cut on the left at both lengths; (2, 300) fits a 512-token MIP segment, not 256
MIP_LENGTHS = [(10, 5), (40, 30), (0, 12), (600, 20), (3, 120), (2, 300)]


# ---------------------------------------------------------------------- the independent parser
def parse_row(batch, b, config, encoding):
    """Check one row against SPEC 5/10 from its tokens alone; return (kind, facts)."""
    ids, tgt = batch.input_ids[b].numpy(), batch.targets[b].numpy()
    loss, seg = batch.loss_mask[b].numpy(), batch.segment_ids[b].numpy()
    prefix = batch.in_prefix[b].numpy()
    pos = batch.position_ids[b].numpy()
    n = int((seg != 0).sum())
    # padding only at the end, inert
    assert (seg[:n] != 0).all() and (seg[n:] == 0).all()
    assert (ids[n:] == SPECIALS.pad).all() and (loss[n:] == 0).all() and not prefix[n:].any()
    # segments numbered 1, 2, ... in order, contiguous
    bounds = np.flatnonzero(np.diff(seg[:n])) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])
    assert list(seg[starts]) == list(range(1, len(starts) + 1))

    kinds, facts = set(), []
    for s, e in zip(starts, ends):
        x, y, lm, pf = ids[s:e], tgt[s:e], loss[s:e], prefix[s:e]
        p = pos[..., s:e]
        sops = np.flatnonzero(x == SPECIALS.sop)
        first = sops[0]
        ctx = x[:first]
        idx = np.arange(e - s)
        assert (pf == (idx < first)).all(), "the bidirectional prefix is exactly the context"
        assert (lm == (idx >= first)).all(), "loss exactly on <sop> and what follows"
        assert (y[:first] == ctx).all(), "unscored context targets are the tokens themselves"
        blocks = np.split(np.arange(first, e - s), sops[1:] - first)
        mask_slots = np.flatnonzero(np.isin(ctx, SPECIALS.mask_ids))
        if encoding == "2d":
            assert (p[0, :first] == idx[:first]).all() and (p[1, :first] == 0).all()
        else:
            assert (p[:first] == idx[:first]).all(), "context positions restart at 0 in each segment"
        if SPECIALS.gmask in ctx:
            kinds.add("gmask")
            assert len(blocks) == 1 and list(mask_slots) == [first - 1] and ctx[-1] == SPECIALS.gmask
            block = blocks[0]
            assert (y[block][:-1] == x[block][1:]).all(), "teacher forcing: a target is the next input"
            if encoding == "2d":
                assert (p[0, block] == first - 1).all() and (p[1, block] == np.arange(1, len(block) + 1)).all()
            else:
                assert (p == idx).all(), "[gMASK] positions count on"
            facts.append(("gmask", np.concatenate([ctx[:-1], y[block]]), len(block)))
            continue
        assert len(mask_slots) == len(blocks) and (ctx[mask_slots] == SPECIALS.mask).all()
        filled, anchors = {}, []
        for block in blocks:
            assert y[block][-1] == SPECIALS.eop and (y[block][:-1] == x[block][1:]).all()
            if encoding == "2d":
                anchor = p[0, block[0]]
                assert (p[0, block] == anchor).all() and (p[1, block] == np.arange(1, len(block) + 1)).all()
            else:
                anchor = p[block[0]]
                assert (p[block] == anchor).all(), "span tokens take their mask's position"
            anchors.append(anchor)
            filled[int(anchor)] = y[block][:-1]
        assert sorted(anchors) == list(mask_slots), "each mask is filled by exactly one span"
        text = np.concatenate([filled[i] if i in filled else ctx[i:i + 1] for i in range(first)])
        if (x >= PROMPT_BASE).any():
            kinds.add("mip")
            assert len(blocks) == 1 and mask_slots[0] == first - 1
            facts.append(("mip", ctx[:-1], y[blocks[0]][:-1]))
        else:
            kinds.add("mask")
            assert e - s == config.mask_segment_length, "a [MASK] segment is filled exactly"
            facts.append(("mask", text, np.array([len(f) for f in filled.values()]), anchors))
    assert len(kinds) == 1
    return kinds.pop(), facts


def source_of(token):
    return "books" if token >= SOURCE_OFFSETS["books"] else "web"


def check_raw_run(text):
    """Rebuilt raw text: consecutive corpus ids of one source, each exactly once."""
    assert (np.diff(text) == 1).all(), "every raw token appears exactly once, in order"
    assert source_of(text[0]) == source_of(text[-1])


def analyse(batches, config, encoding="1d", pairs=None):
    """Parse every row; check the per-kind rules; return statistics."""
    stats = {"kinds": [], "sources": [], "suffix": [], "covered": [], "spans": []}
    orders = []  # per [MASK] segment: (mask positions, span lengths), both in generation order
    pair_by_target = {int(p.target[0]) if len(p.target) else None: p for p in pairs or []}
    for batch in batches:
        for b in range(batch.input_ids.shape[0]):
            kind, facts = parse_row(batch, b, config, encoding)
            stats["kinds"].append(kind)
            if kind == "gmask":
                (_, text, t), = facts
                check_raw_run(text)
                assert len(text) == config.gmask_raw_length
                stats["sources"].append(source_of(text[0]))
                stats["suffix"].append(t)
            elif kind == "mask":
                check_raw_run(np.concatenate([f[1] for f in facts]))
                stats["sources"].append(source_of(facts[0][1][0]))
                for _, text, lengths, anchors in facts:
                    raw = len(text)
                    assert raw == config.mask_segment_length - 2 * len(lengths)
                    covered = lengths.sum()
                    # stopping rule (the official one): covered >= int(ratio x chunk), reached at
                    # the last draw only (whichever span came last, dropping the longest
                    # undershoots the threshold of k-1 spans, whose chunk was 2 tokens longer)
                    assert covered >= math.floor(config.mask_ratio * raw + 1e-9)
                    assert covered - lengths.max() < math.floor(config.mask_ratio * (raw + 2) + 1e-9)
                    assert 1 <= lengths.min() and lengths.max() <= config.max_span_length
                    stats["covered"].append(covered)
                    stats["spans"].append(len(lengths))
                    orders.append((np.array(anchors), lengths))
            else:
                assert len(facts) == config.mip_segments
                for _, prompt, target in facts:
                    pair = pair_by_target[int(target[0])] if len(target) else pair_by_target[None]
                    assert (target == pair.target).all(), "a MIP target is never cut"
                    assert len(prompt) <= len(pair.prompt)
                    assert (prompt == pair.prompt[len(pair.prompt) - len(prompt):]).all()
                    # a cut prompt fills its segment exactly
                    assert len(prompt) == len(pair.prompt) or \
                        len(prompt) + len(target) + 2 == config.mip_segment_length
    return {**{k: np.array(v) for k, v in stats.items()}, "orders": orders}


def stopping_moments(config):
    """Exact moments of (covered C, span count k) of one [MASK] segment under the stopping rule
    "draw Poisson(lambda) lengths restricted to 1..cap until C >= int(ratio x (segment - 2k))", by dynamic
    programming over the not-yet-stopped (k, C) states."""
    lam, cap, S, r = config.poisson_lambda, config.max_span_length, config.mask_segment_length, config.mask_ratio
    pmf = np.array([0.0] + [lam ** i / math.factorial(i) for i in range(1, cap + 1)])
    pmf /= pmf.sum()
    alive = np.array([1.0])
    m = dict.fromkeys(("C", "C2", "k", "k2", "Ck"), 0.0)
    for k in range(1, S):
        alive = np.convolve(alive, pmf)
        c = np.arange(len(alive))
        stop = c >= math.floor(r * (S - 2 * k) + 1e-9)
        w = np.where(stop, alive, 0.0)
        m["C"] += (w * c).sum(); m["C2"] += (w * c * c).sum()
        m["k"] += w.sum() * k; m["k2"] += w.sum() * k * k; m["Ck"] += (w * c).sum() * k
        alive = np.where(stop, 0.0, alive)
        if alive.sum() < 1e-15:
            break
    mean_length = (pmf * np.arange(cap + 1)).sum()
    return m, mean_length


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def small():
    """3840 rows at sequence length 256 (64 rows x 60 steps): the statistics sample."""
    config = ObjectiveConfig.for_sequence_length(256)
    pairs = make_pairs(MIP_LENGTHS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (2, 300) does not fit: checked in its own test
        sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, batch_size=64, seed=1234, mip_pairs=pairs)
    batches = [sampler.micro_batch(step) for step in range(60)]
    return config, sampler, analyse(batches, config, pairs=sampler.mip_pairs), batches


# ---------------------------------------------------------------------- config
def test_recipe_preset_and_scaling():
    recipe = ObjectiveConfig.glm130b()
    assert (recipe.sequence_length, recipe.gmask_raw_length, recipe.mask_segments,
            recipe.mask_segment_length, recipe.mip_segments) == (2048, 2000, 4, 512, 4)
    assert (recipe.gmask_share, recipe.mip_share, recipe.mask_ratio, recipe.poisson_lambda,
            recipe.max_span_length) == (0.7, 0.05, 0.15, 3.0, 39)
    assert ObjectiveConfig.for_sequence_length(2048) == recipe
    small = ObjectiveConfig.for_sequence_length(256)
    assert (small.gmask_raw_length, small.mask_segment_length, small.mip_segments) == (250, 64, 1)
    assert small.max_span_length < 39  # a 64-token segment cannot be sure to place 39-token spans
    assert ObjectiveConfig.from_dict(small.to_dict()) == small


@pytest.mark.parametrize("fields", [dict(gmask_raw_length=2048), dict(mask_segment_length=600),
                                    dict(mask_ratio=0.3), dict(max_span_length=300),
                                    dict(suffix_fraction_min=0.0), dict(mip_share=1.5)])
def test_config_refuses_unbuildable_values(fields):
    with pytest.raises(ConfigError):
        ObjectiveConfig(**fields)


def test_config_names_unknown_fields():
    with pytest.raises(ConfigError, match="unknown ObjectiveConfig field"):
        ObjectiveConfig.from_dict({"sequence_lenght": 512})


# ---------------------------------------------------------------------- invariants
def test_every_rule_holds_over_thousands_of_rows(small):
    """analyse() ran the parser over all 3840 rows; this asserts all three kinds were exercised."""
    config, _, stats, _ = small
    assert len(stats["kinds"]) == 3840
    assert set(stats["kinds"]) == {"gmask", "mask", "mip"}


def test_every_rule_holds_at_the_recipe_length_in_both_encodings():
    config = ObjectiveConfig.glm130b()
    pairs = make_pairs(MIP_LENGTHS)
    for encoding in ("1d", "2d"):
        sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, batch_size=24, seed=7,
                                  mip_pairs=pairs, position_encoding=encoding)
        batches = [sampler.micro_batch(step) for step in range(2)]
        assert batches[0].position_ids.shape == ((24, 2, 2048) if encoding == "2d" else (24, 2048))
        stats = analyse(batches, config, encoding, pairs=sampler.mip_pairs)
        assert len(stats["kinds"]) == 48


@pytest.mark.parametrize("length", [32, 100, 777])
def test_every_rule_holds_at_odd_and_tiny_lengths(length):
    """for_sequence_length down to its minimum (8-token [MASK] segments) and at lengths that do
    not divide by 4 or 512."""
    config = ObjectiveConfig.for_sequence_length(length)
    sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, batch_size=128, seed=length,
                              mip_pairs=make_pairs([(5, 3), (40, 8)]))
    stats = analyse([sampler.micro_batch(0)], config, pairs=sampler.mip_pairs)
    assert set(stats["kinds"]) >= {"gmask", "mask"}


def test_dense_mask_matches_the_rule_rebuilt_from_tokens(small):
    """Expected mask from the tokens alone: same segment, and the key is before the segment's
    first <sop> or not after the query. Compared with the batch's compact-form dense mask."""
    _, _, _, batches = small
    batch = batches[0]
    blocked = batch.attention_mask()[:, 0].numpy()
    for b in range(batch.input_ids.shape[0]):
        ids, seg = batch.input_ids[b].numpy(), batch.segment_ids[b].numpy()
        L = len(ids)
        first_sop = np.zeros(L, int)
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            first_sop[where] = where[0] + np.argmax(ids[where] == SPECIALS.sop)
        q, k = np.arange(L)[:, None], np.arange(L)[None, :]
        visible = (seg[:, None] == seg[None, :]) & (seg[None, :] > 0) & ((k < first_sop[None, :]) | (k <= q))
        real = seg > 0
        assert (~blocked[b][real] == visible[real]).all()


def test_mip_prompt_is_cut_on_the_left_and_target_kept():
    pair = make_pairs([(600, 20)])[0]
    sample = mip_segment(pair, 64, SPECIALS)
    assert len(sample) == 64
    assert (sample.input_ids[:42] == pair.prompt[-42:]).all()  # 64 - 20 - [MASK] - <sop>
    assert (sample.targets[sample.loss_mask] == np.append(pair.target, SPECIALS.eop)).all()
    with pytest.raises(GLMError, match="does not fit"):
        mip_segment(make_pairs([(0, 63)])[0], 64, SPECIALS)


def test_mip_pairs_too_long_are_left_out_with_a_warning():
    config = ObjectiveConfig.for_sequence_length(256)
    with pytest.warns(UserWarning, match="1 of 6 MIP pairs"):
        sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 4, 0, mip_pairs=make_pairs(MIP_LENGTHS))
    assert len(sampler.mip_pairs) == 5
    with pytest.raises(ConfigError, match="no MIP pair fits"), pytest.warns(UserWarning):
        GLMBatchSampler(FakeCorpus(), config, SPECIALS, 4, 0, mip_pairs=make_pairs([(1, 255)]))


def test_without_mip_pairs_the_mix_is_self_supervised_and_says_so():
    config = ObjectiveConfig.for_sequence_length(256)
    with pytest.warns(UserWarning, match="no MIP pairs"):
        sampler = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 64, 3)
    stats = analyse([sampler.micro_batch(0)], config)
    assert "mip" not in set(stats["kinds"])


def test_corpus_too_small_is_refused():
    with pytest.raises(ConfigError, match="fewer than the 2048"):
        GLMBatchSampler(FakeCorpus(num_tokens=2047), ObjectiveConfig.glm130b(), SPECIALS, 4, 0,
                        mip_pairs=make_pairs([(3, 3)]))
    # [gMASK] only (the trainer's validation mix) reads 2000 tokens per row
    gmask_only = dataclasses.replace(ObjectiveConfig.glm130b(), gmask_share=1.0, mip_share=0.0)
    GLMBatchSampler(FakeCorpus(num_tokens=2000), gmask_only, SPECIALS, 4, 0).micro_batch(0)
    with pytest.raises(ConfigError, match="fewer than the 2000"):
        GLMBatchSampler(FakeCorpus(num_tokens=1999), gmask_only, SPECIALS, 4, 0)


# ---------------------------------------------------------------------- statistics
def test_mix_shares_match_the_recipe(small):
    """Counts of each kind are binomial(N, p); 5 sigma = 5 sqrt(p (1-p) / N)."""
    config, _, stats, _ = small
    N = len(stats["kinds"])
    expected = {"mip": config.mip_share, "gmask": (1 - config.mip_share) * config.gmask_share,
                "mask": (1 - config.mip_share) * (1 - config.gmask_share)}
    for kind, p in expected.items():
        share = (stats["kinds"] == kind).mean()
        assert abs(share - p) <= SIGMAS * math.sqrt(p * (1 - p) / N), (kind, share, p)
    n_self = len(stats["sources"])
    books = (stats["sources"] == "books").mean()
    p = SOURCE_WEIGHTS["books"]
    assert abs(books - p) <= SIGMAS * math.sqrt(p * (1 - p) / n_self)


def test_gmask_suffix_length_is_uniform_over_its_range(small):
    """Suffix t uniform on the integers [ceil(0.2 n), n]: mean (a+b)/2, variance ((b-a+1)^2-1)/12;
    the sample mean is within 5 standard errors, and each half of the range holds its share."""
    config, _, stats, _ = small
    n = config.gmask_raw_length
    a, b = math.ceil(config.suffix_fraction_min * n), n
    t = stats["suffix"]
    assert t.min() >= a and t.max() <= b
    sd = math.sqrt(((b - a + 1) ** 2 - 1) / 12)
    assert abs(t.mean() - (a + b) / 2) <= SIGMAS * sd / math.sqrt(len(t))
    lower = (b - a + 1) // 2  # values a .. a+lower-1
    p = lower / (b - a + 1)
    assert abs((t < a + lower).mean() - p) <= SIGMAS * math.sqrt(p * (1 - p) / len(t))


def check_span_statistics(covered, spans, config):
    """Masked fraction sum(C)/sum(raw) and mean span length sum(C)/sum(k) against their exact
    limits from stopping_moments; the standard error of a ratio of sums by the delta method:
    sd(R) = sqrt(Var(C - R* X) / N) / E[X] for R* = E[C]/E[X]."""
    m, mean_length = stopping_moments(config)
    N, S = len(covered), config.mask_segment_length
    var_C, var_k, cov_Ck = m["C2"] - m["C"] ** 2, m["k2"] - m["k"] ** 2, m["Ck"] - m["C"] * m["k"]
    # Wald's identity: E[C] = E[k] x mean length, whatever the stopping rule; checks the DP itself.
    assert m["C"] / m["k"] == pytest.approx(mean_length, rel=1e-9)
    mu = mean_length
    sd_mu = math.sqrt((var_C + mu ** 2 * var_k - 2 * mu * cov_Ck) / N) / m["k"]
    assert abs(covered.sum() / spans.sum() - mu) <= SIGMAS * sd_mu
    raw = S - 2 * spans
    rho = m["C"] / (S - 2 * m["k"])  # Var(C - rho (S - 2k)) = Var C + 4 rho^2 Var k + 4 rho Cov(C, k)
    sd_rho = math.sqrt((var_C + 4 * rho ** 2 * var_k + 4 * rho * cov_Ck) / N) / (S - 2 * m["k"])
    assert abs(covered.sum() / raw.sum() - rho) <= SIGMAS * sd_rho
    return rho, mu


def test_masked_fraction_and_span_length_match_the_recipe(small):
    config, _, stats, _ = small
    rho, mu = check_span_statistics(stats["covered"], stats["spans"], config)
    # Poisson(3) restricted to >= 1 has mean 3 / (1 - e^-3); the cap at 23 removes < 1e-12 of it.
    assert mu == pytest.approx(3 / (1 - math.exp(-3)), rel=1e-9)
    # int(15 %) plus the last span's overshoot, which weighs more in 64-token segments
    assert 0.15 < rho < 0.18  # exact: 17.1 %


def test_span_order_is_shuffled_in_the_text_and_in_the_generated_part(small):
    """Generated part: in a uniformly random order of k spans the number of ascents (a span
    followed by one further right in the text) has mean (k-1)/2 and variance (k+1)/12; summed over
    independent segments, within 5 sigma. Text: the stopping rule makes the last draw long (size
    biased), so unshuffled text would end with longer spans: the first and last spans in text
    order must have the same mean length (difference within 5 standard errors)."""
    _, _, stats, _ = small
    orders = [(a, l) for a, l in stats["orders"] if len(a) >= 2]
    ascents = sum(int((np.diff(a) > 0).sum()) for a, _ in orders)
    k = np.array([len(a) for a, _ in orders])
    assert abs(ascents - ((k - 1) / 2).sum()) <= SIGMAS * math.sqrt(((k + 1) / 12).sum())
    in_text = [l[np.argsort(a)] for a, l in orders]
    first, last = np.array([t[0] for t in in_text]), np.array([t[-1] for t in in_text])
    standard_error = math.sqrt((first.var() + last.var()) / len(orders))
    assert abs(last.mean() - first.mean()) <= SIGMAS * standard_error


def test_masked_fraction_and_span_length_at_the_recipe_length():
    """4000 segments of 512 built by mask_sample directly; counts from the token ids only:
    k = number of [MASK] tokens in a segment, C = scored tokens - k (each span adds <eop>)."""
    config = ObjectiveConfig.glm130b()
    raw = np.arange(config.mask_window_length) + 10
    samples = [mask_sample(raw, np.random.default_rng([11, i]), config, SPECIALS) for i in range(1000)]
    seg = np.stack([s.segment_ids for s in samples])
    is_mask = np.stack([s.input_ids == SPECIALS.mask for s in samples])
    scored = np.stack([s.loss_mask for s in samples])
    spans = np.stack([(is_mask & (seg == i)).sum(1) for i in range(1, 5)], 1).ravel()
    covered = np.stack([(scored & (seg == i)).sum(1) for i in range(1, 5)], 1).ravel() - spans
    rho, _ = check_span_statistics(covered, spans, config)
    assert 0.15 < rho < 0.155  # exact: 15.2 %; the official rule gives 15.3 % of its 500-token chunks


# ---------------------------------------------------------------------- determinism
def test_batches_depend_only_on_seed_and_step(small):
    config, sampler, _, batches = small
    twin = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 64, 1234, mip_pairs=sampler.mip_pairs)
    again = twin.micro_batch(17)
    for name in ("input_ids", "position_ids", "targets", "loss_mask", "segment_ids", "in_prefix"):
        assert torch.equal(getattr(again, name), getattr(batches[17], name))
    assert not torch.equal(twin.micro_batch(18).input_ids, batches[17].input_ids)
    other = GLMBatchSampler(FakeCorpus(), config, SPECIALS, 64, 99, mip_pairs=sampler.mip_pairs)
    assert not torch.equal(other.micro_batch(17).input_ids, batches[17].input_ids)


def test_validation_batches_are_fixed_and_apart_from_training(small):
    config, sampler, _, batches = small
    first, second = sampler.validation_batches(2), sampler.validation_batches(2)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, second))
    assert not any(torch.equal(v.input_ids, t.input_ids) for v in first for t in batches)
    analyse(first, config, pairs=sampler.mip_pairs)


# ---------------------------------------------------------------------- MIP loader
class CharTokenizer:
    def encode(self, text):
        return [1000 + ord(c) for c in text]


def test_load_mip_pairs_reads_text_and_token_lists(tmp_path):
    path = tmp_path / "mip.jsonl"
    lines = [{"prompt": "Translate: chat", "target": "cat"}, {"prompt": [7, 8, 9], "target": [10]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    pairs = load_mip_pairs(path, CharTokenizer())
    assert [list(p.target) for p in pairs] == [[1000 + ord(c) for c in "cat"], [10]]
    assert list(pairs[1].prompt) == [7, 8, 9]
    sample = mip_sample(pairs, np.random.default_rng(0), ObjectiveConfig.for_sequence_length(256), SPECIALS)
    assert sample.input_ids[-1] in (1000 + ord("t"), 10)


@pytest.mark.parametrize("line, message", [('{"prompt": "a"}', "'prompt' and 'target'"),
                                           ("{not json", "not valid JSON"),
                                           ('{"prompt": "a", "target": "b"}', "no tokenizer"),
                                           ('{"prompt": [1, -2], "target": [3]}', "non-negative")])
def test_load_mip_pairs_explains_bad_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(GLMError, match=message):
        load_mip_pairs(path)


# ---------------------------------------------------------------------- FlexAttention
def test_flex_block_mask_matches_the_dense_mask():
    """flex_attention with the block mask equals SDPA with the dense mask on every real row, and
    blocks between the 128-token segments of a [MASK] row are skipped entirely."""
    from torch.nn.attention.flex_attention import flex_attention
    config = ObjectiveConfig.for_sequence_length(512)
    rng = np.random.default_rng(5)
    raw = np.arange(config.mask_window_length) + 10
    samples = [mask_sample(raw, rng, config, SPECIALS), gmask_sample(raw[:config.gmask_raw_length], rng, config, SPECIALS),
               mip_sample(make_pairs([(50, 20), (300, 40)]), rng, config, SPECIALS)]
    batch = collate(samples, config.sequence_length, SPECIALS.pad)
    block_mask = flex_block_mask(batch.segment_ids, batch.in_prefix)
    tiles = block_mask.to_dense()[0, 0]  # [4, 4] blocks of the [MASK] row: segments are blocks
    assert torch.equal(tiles.bool(), torch.eye(4, dtype=torch.bool))
    q, k, v = torch.randn(3, 3, 2, config.sequence_length, 16).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        flex = flex_attention(q, k, v, block_mask=block_mask)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~batch.attention_mask())
    real = batch.segment_ids > 0
    torch.testing.assert_close(flex.transpose(1, 2)[real], dense.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
