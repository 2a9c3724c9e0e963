"""Decoding strategies on synthetic logits: per-row top-k/top-p, sampling, beam search."""

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from glm130b.core.errors import ConfigError, InputError
from glm130b.generate.strategies import (
    BeamSearch,
    BeamState,
    Greedy,
    Sampling,
    TokenChooser,
    filter_logits,
    repeated_ngram_bans,
    strategy_from_name,
)


def kept_by_hand(logits_row: list[float], top_k: int, top_p: float) -> set[int]:
    """The official rule (SwissArmyTransformer 0.2.12 top_k_logits), token by token: top-k drops
    every logit below the k-th largest (ties with it stay); top-p, on what is left, drops a token
    once the renormalised mass before it exceeds top_p."""
    order = sorted(range(len(logits_row)), key=lambda i: -logits_row[i])
    if top_k > 0:
        kth = logits_row[order[min(top_k, len(order)) - 1]]
        order = [i for i in order if logits_row[i] >= kth]
    weights = [math.exp(logits_row[i]) for i in order]
    total = sum(weights)
    kept, mass = set(), 0.0
    for i, w in zip(order, weights):
        if top_p < 1.0 and mass > top_p:
            break
        kept.add(i)
        mass += w / total
    return kept


def test_top_k_top_p_keep_exactly_the_right_tokens_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 2
    top_k = torch.tensor([0, 1, 5, 0, 7, 40])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.8, 0.3])
    filtered = filter_logits(logits, top_k, top_p)
    for b in range(6):
        expected = kept_by_hand(logits[b].tolist(), int(top_k[b]), float(top_p[b]))
        got = set(torch.nonzero(filtered[b] > float("-inf")).flatten().tolist())
        assert got == expected, f"row {b}"
        # kept tokens keep their logits unchanged
        assert torch.equal(filtered[b, sorted(got)], logits[b, sorted(got)])
    # rows are independent: a row alone gives the same result as in the batch
    alone = filter_logits(logits[3:4], top_k[3:4], top_p[3:4])
    assert torch.equal(alone[0], filtered[3])


def test_top_p_keeps_a_token_while_the_mass_before_it_is_at_most_top_p():
    """The official rule at a tie: four equal tokens (probability exactly 0.25 each); a token stays
    while the mass before it is <= top_p, so top_p 0.5 keeps three (the mass before the third is
    exactly 0.5). Before issue #14 this asserted the opposite (< top_p: two tokens)."""
    logits = torch.zeros(1, 4)
    keep = lambda p: (filter_logits(logits, torch.tensor([0]), torch.tensor([p])) > float("-inf")).sum().item()
    assert [keep(p) for p in (0.2, 0.25, 0.3, 0.5, 0.75, 1.0)] == [1, 2, 2, 3, 4, 4]
    # a tie after top-k: two of four tokens left, 0.5 each; top_p 0.5 keeps both
    two = torch.tensor([[0.0, 0.0, -1.0, -2.0]])
    assert (filter_logits(two, torch.tensor([2]), torch.tensor([0.5])) > float("-inf")).tolist() == [
        [True, True, False, False]
    ]


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    kept = filter_logits(logits, torch.tensor([2, 1]), torch.tensor([1.0, 1.0])) > float("-inf")
    assert kept.tolist() == [[True, True, True, False, True], [True] * 5]


def _official_top_k_logits():
    """SwissArmyTransformer 0.2.12's top_k_logits (the filter GLM-130B's BaseStrategy calls), loaded
    from the installed package's file alone (the package itself imports deepspeed); None without it."""
    spec = importlib.util.find_spec("SwissArmyTransformer")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "generation" / "sampling_strategies" / "base_strategy.py"
    module_spec = importlib.util.spec_from_file_location("sat_base_strategy", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.top_k_logits


def test_filter_equals_the_official_function_row_by_row():
    """Against the official function itself (at batch size 1, the only size its top-p supports), on
    rows with many ties: coarse logits make ties at the k-th value and at the top-p boundary."""
    official = _official_top_k_logits()
    if official is None:
        pytest.skip("SwissArmyTransformer 0.2.12 is not installed (`make install` installs it --no-deps)")
    g = torch.Generator().manual_seed(5)
    for trial in range(200):
        row = torch.randint(-3, 3, (1, 12), generator=g).float()  # integer logits: ties everywhere
        top_k = int(torch.randint(0, 6, (), generator=g))
        top_p = [0.0, 0.3, 0.5, 0.7, 0.9][trial % 5]
        theirs = official(row.clone(), top_k, top_p) > -65504  # they filter to -65504
        ours = filter_logits(row, torch.tensor([top_k]), torch.tensor([top_p if top_p > 0 else 1.0]))
        assert torch.equal(ours > float("-inf"), theirs), (row.tolist(), top_k, top_p)


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = torch.log(probs).repeat(n, 1)
    chooser = TokenChooser(Sampling(top_p=0.7, seed=0), n, torch.device("cpu"))
    counts = torch.bincount(chooser(logits), minlength=4).float() / n
    # top-p 0.7 keeps {0, 1} (mass before token 2: 0.8), renormalised to 0.625 / 0.375; 3 standard errors ~ 0.011
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 0.625) < 0.02 and abs(counts[1] - 0.375) < 0.02


def test_temperature_and_per_row_options():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(3, 1)
    chooser = TokenChooser(
        Sampling(temperature=[0.0, 1.0, 1.0], top_k=[0, 1, 0], top_p=[1.0, 1.0, 1.0], seed=3), 3, torch.device("cpu")
    )
    for _ in range(20):
        tokens = chooser(logits)
        assert tokens[0] == 0 and tokens[1] == 0  # temperature 0 and top-k 1 are greedy
    with pytest.raises(InputError, match="2 values for 3 prompts"):
        TokenChooser(Sampling(top_k=[1, 2]), 3, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\], got 0.0"):
        Sampling(top_p=0.0)
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\], got 1.5"):
        Sampling(top_p=[0.5, 1.5])
    with pytest.raises(ConfigError, match="temperature must be a number >= 0"):
        Sampling(temperature=-0.1)
    with pytest.raises(ConfigError, match="top_k must be an integer >= 0, got 2.5"):
        Sampling(top_k=2.5)
    with pytest.raises(InputError, match="unknown strategy 'nucleus'"):
        strategy_from_name("nucleus")


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    runs = {}
    for seed in (5, 5, 6):
        chooser = TokenChooser(Sampling(seed=seed), 4, torch.device("cpu"))
        runs.setdefault(seed, []).append(torch.stack([chooser(logits) for _ in range(10)]))
    assert torch.equal(runs[5][0], runs[5][1])
    assert not torch.equal(runs[5][0], runs[6][0])


def test_greedy_is_argmax():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(TokenChooser(Greedy(), 5, torch.device("cpu"))(logits), logits.argmax(-1))


# ------------------------------------------------------------------------------ beam search
V = 5
ENDS = [3, 4]


def table_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed 'model': logits that depend on the whole prefix (a seeded draw per prefix)."""
    seed = hash(prefix) % (2**31)
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5


def run_beams(strategy: BeamSearch, prompt_length: int, horizon: int) -> BeamState:
    state = BeamState(strategy, prompt_length, horizon, ENDS, torch.device("cpu"))
    rows = [()] * strategy.num_beams
    while True:
        logits = torch.stack([table_logits(r) for r in rows])
        chosen = state.step(logits)
        if chosen is None:
            return state
        parents, tokens = chosen
        rows = [rows[p] + (t,) for p, t in zip(parents.tolist(), tokens.tolist())]


def exhaustive(prompt_length: int, horizon: int, length_penalty: float) -> list[tuple[float, tuple]]:
    """Every sequence of at most `horizon` tokens that ends at its first end token, or has
    `horizon` tokens without one, scored by its length-normalised log-prob; best first."""
    out = []
    for n in range(1, horizon + 1):
        for seq in itertools.product(range(V), repeat=n):
            if any(t in ENDS for t in seq[:-1]) or (n < horizon and seq[-1] not in ENDS):
                continue
            logp = sum(torch.log_softmax(table_logits(seq[:i]), -1)[seq[i]].item() for i in range(n))
            out.append((logp / ((5 + prompt_length + n) / 6) ** length_penalty, seq))
    return sorted(out, reverse=True)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
def test_beam_search_with_room_for_everything_equals_exhaustive_search(length_penalty):
    horizon, prompt_length = 4, 6
    expected = exhaustive(prompt_length, horizon, length_penalty)
    # 3 non-end tokens, 2 end tokens: 2 + 6 + 18 + (54 + 81) = 161 hypotheses; 192 beams hold them all
    assert len(expected) == 161
    state = run_beams(
        BeamSearch(num_beams=192, length_penalty=length_penalty, no_repeat_ngram_size=0), prompt_length, horizon
    )
    got = [(h.score, tuple(h.tokens)) for h in state.finished]
    assert [s for _, s in got] == [s for _, s in expected]
    for (a, _), (b, _) in zip(got, expected):
        assert a == pytest.approx(b, abs=1e-5)


def test_beam_search_best_equals_exhaustive_with_fewer_beams_when_it_can():
    """With 4 beams the search may miss the optimum; it must never report a score it did not earn."""
    state = run_beams(BeamSearch(num_beams=4, no_repeat_ngram_size=0), 6, 4)
    truth = dict((seq, s) for s, seq in exhaustive(6, 4, 1.0))
    for h in state.finished:
        assert truth[tuple(h.tokens)] == pytest.approx(h.score, abs=1e-5)


def test_no_repeat_ngram_and_min_length():
    def favour_repeats(prefix):  # always prefers token 0, then 1; ends are likely
        logits = torch.tensor([3.0, 2.5, 0.0, 2.8, 2.8])
        return logits

    state = BeamState(BeamSearch(num_beams=3, no_repeat_ngram_size=2, min_length=5), 4, 8, ENDS, torch.device("cpu"))
    rows = [()] * 3
    while (chosen := state.step(torch.stack([favour_repeats(r) for r in rows]))) is not None:
        rows = [rows[p] + (t,) for p, t in zip(*(c.tolist() for c in chosen))]
    for h in state.finished:
        body = [t for t in h.tokens if t not in ENDS]
        grams = [tuple(body[i : i + 2]) for i in range(len(body) - 1)]
        assert len(grams) == len(set(grams)), h.tokens
        assert all(t not in ENDS for t in h.tokens[:5]), h.tokens


def test_repeated_ngram_bans():
    assert repeated_ngram_bans([1, 2, 3, 1, 2], 3) == [3]
    assert sorted(repeated_ngram_bans([1, 2, 1, 3, 1], 2)) == [2, 3]
    assert repeated_ngram_bans([1, 2], 3) == []
    assert repeated_ngram_bans([4, 4, 5], 1) == [4, 5]


def test_first_step_expands_beam_zero_only():
    state = BeamState(BeamSearch(num_beams=3), 2, 5, ENDS, torch.device("cpu"))
    logits = torch.zeros(3, V)
    logits[1, 2] = 10.0  # would win if beam 1 were expanded
    parents, _ = state.step(logits)
    assert parents.tolist() == [0, 0, 0]


def test_beam_scan_stops_once_num_beams_continue():
    """The official scan (GLM-130B generation/strategies.py, BeamSearchStrategy.forward): candidates
    best first; an end token finishes a hypothesis, another token continues a beam while fewer
    than num_beams do, and the first other token after that stops the scan: end candidates ranked
    below it are never kept."""

    def finished_after_first_step(end_logits):
        state = BeamState(BeamSearch(num_beams=2, no_repeat_ngram_size=0), 3, 5, ENDS, torch.device("cpu"))
        logits = torch.zeros(2, V)
        logits[0] = torch.tensor([5.0, 4.0, 1.0, *end_logits])  # tokens 3 and 4 end
        parents, tokens = state.step(logits)
        assert tokens.tolist() == [0, 1]
        return sorted(h.tokens for h in state.finished)

    assert finished_after_first_step([4.5, 3.0]) == [[3], [4]]  # both rank above token 2
    assert finished_after_first_step([3.0, 0.0]) == [[3]]  # 0, 1, 3, then 2 stops the scan
    assert finished_after_first_step([0.5, 0.0]) == []  # 0, 1, then 2 stops it


def test_beam_options_are_checked():
    for options, message in (
        (dict(num_beams=0), "num_beams must be a positive integer"),
        (dict(min_length=-1), "min_length must be an integer >= 0"),
        (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size must be an integer >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            BeamSearch(**options)


def test_drawn_beam_candidates_are_reproducible_and_differ_from_the_top_ones():
    """draw_candidates=True draws each step's candidates from the softmax of the cumulative scores
    (the reference's stochastic beams): the same seed gives the same beams; over several seeds the
    draws do not always equal the deterministic top candidates."""
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(4))  # 9 candidates of 200

    def first_step(strategy):
        state = BeamState(strategy, 4, 6, ENDS, torch.device("cpu"))
        return [c.tolist() for c in state.step(logits)]

    top = first_step(BeamSearch(num_beams=3))
    drawn = [first_step(BeamSearch(num_beams=3, draw_candidates=True, seed=seed)) for seed in range(8)]
    assert drawn[0] == first_step(BeamSearch(num_beams=3, draw_candidates=True, seed=0))
    assert any(d != top for d in drawn)
    assert all(parents == [0, 0, 0] for parents, _ in drawn)  # the first step expands beam 0 only


# ------------------------------------------------------------------------------ the reference's evaluation options
def test_prompt_length_multiple_counts_the_padded_prompt():
    """prompt_length_multiple=32: a 6-token prompt counts as 32 in the length penalty, so the
    hypotheses rank as exhaustive search ranks them with a 32-token prompt."""
    state = run_beams(BeamSearch(num_beams=192, prompt_length_multiple=32, no_repeat_ngram_size=0), 6, 4)
    expected = exhaustive(32, 4, 1.0)
    assert [tuple(h.tokens) for h in state.finished] == [s for _, s in expected]
    assert [h.score for h in state.finished] == pytest.approx([s for s, _ in expected], abs=1e-5)


def test_reference_stop_ends_when_the_worst_finished_beats_the_best_running_at_the_current_length():
    logits = torch.tensor([[2.0, -5.0, -5.0, 2.1, -5.0]])  # the end token 3 just beats token 0
    lp = torch.log_softmax(logits[0], -1)
    finished = lp[3] / ((5 + 2 + 1) / 6)
    assert finished >= lp[0] / ((5 + 2 + 1) / 6)  # reference: running token 0 normalised at length 3
    assert finished < lp[0] / ((5 + 2 + 8) / 6)  # exact bound: it might still win by length 10
    reference = BeamState(BeamSearch(num_beams=1, reference_stop=True), 2, 8, ENDS, torch.device("cpu"))
    assert reference.step(logits) is None and reference.hypotheses() == [[3]]
    exact = BeamState(BeamSearch(num_beams=1), 2, 8, ENDS, torch.device("cpu"))
    assert exact.step(logits) is not None


def test_banned_prefixes_apply_to_the_first_generated_tokens_only():
    strategy = BeamSearch(num_beams=2, banned_prefixes=((2,), (0, 1)))
    state = BeamState(strategy, 2, 5, ENDS, torch.device("cpu"))
    first = torch.tensor([[0.0, 1.0, 9.0, -9.0, -9.0]] * 2)  # token 2 would win the first step
    parents, tokens = state.step(first)
    assert 2 not in tokens.tolist() and sorted(tokens.tolist()) == [0, 1]
    second = torch.tensor([[0.0, 9.0, 8.0, -9.0, -9.0]] * 2)  # token 1 wins everywhere, 2 is second
    state.step(second)
    # (0, 1) is banned as a prefix; with 1 banned, beam [0] puts nearly all its mass on 2 (bans
    # renormalise, as the reference's -65504 fill before log_softmax does), and 2 is allowed now
    assert state.beams == [[1, 1], [0, 2]]
