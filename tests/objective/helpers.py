"""Shared helpers of the objective tests: a corpus of unique token ids, MIP pairs in ranges of
their own, the independent row parser that checks every rule of SPEC.md sections 5 and 10 from the
tokens alone, and the exact moments of the [MASK] stopping rule the statistics are compared with."""

import math

import numpy as np
import pytest

from glm130b.objective.samples import MIPPair
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
    return [
        MIPPair(PROMPT_BASE + 10_000 * i + np.arange(p), TARGET_BASE + 10_000 * i + np.arange(t))
        for i, (p, t) in enumerate(lengths)
    ]


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
        text = np.concatenate([filled[i] if i in filled else ctx[i : i + 1] for i in range(first)])
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
                ((_, text, t),) = facts
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
                    assert (prompt == pair.prompt[len(pair.prompt) - len(prompt) :]).all()
                    # a cut prompt fills its segment exactly
                    assert len(prompt) == len(pair.prompt) or len(prompt) + len(target) + 2 == config.mip_segment_length
    return {**{k: np.array(v) for k, v in stats.items()}, "orders": orders}


def stopping_moments(config):
    """Exact moments of (covered C, span count k) of one [MASK] segment under the stopping rule
    "draw Poisson(lambda) lengths restricted to 1..cap until C >= int(ratio x (segment - 2k))", by dynamic
    programming over the not-yet-stopped (k, C) states."""
    lam, cap, S, r = config.poisson_lambda, config.max_span_length, config.mask_segment_length, config.mask_ratio
    pmf = np.array([0.0] + [lam**i / math.factorial(i) for i in range(1, cap + 1)])
    pmf /= pmf.sum()
    alive = np.array([1.0])
    m = dict.fromkeys(("C", "C2", "k", "k2", "Ck"), 0.0)
    for k in range(1, S):
        alive = np.convolve(alive, pmf)
        c = np.arange(len(alive))
        stop = c >= math.floor(r * (S - 2 * k) + 1e-9)
        w = np.where(stop, alive, 0.0)
        m["C"] += (w * c).sum()
        m["C2"] += (w * c * c).sum()
        m["k"] += w.sum() * k
        m["k2"] += w.sum() * k * k
        m["Ck"] += (w * c).sum() * k
        alive = np.where(stop, 0.0, alive)
        if alive.sum() < 1e-15:
            break
    mean_length = (pmf * np.arange(cap + 1)).sum()
    return m, mean_length


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
    sd_mu = math.sqrt((var_C + mu**2 * var_k - 2 * mu * cov_Ck) / N) / m["k"]
    assert abs(covered.sum() / spans.sum() - mu) <= SIGMAS * sd_mu
    raw = S - 2 * spans
    rho = m["C"] / (S - 2 * m["k"])  # Var(C - rho (S - 2k)) = Var C + 4 rho^2 Var k + 4 rho Cov(C, k)
    sd_rho = math.sqrt((var_C + 4 * rho**2 * var_k + 4 * rho * cov_Ck) / N) / (S - 2 * m["k"])
    assert abs(covered.sum() / raw.sum() - rho) <= SIGMAS * sd_rho
    return rho, mu
