"""The decode loop (glm130b.generate.decode): static-cache decoding against full forwards, one
compiled graph, beam search against exhaustive search, a tiny trained model under every strategy."""

import itertools

import pytest
import torch

import glm130b.generate.decode as gen
from glm130b import GLM
from glm130b.core.errors import InputError
from glm130b.generate.decode import (
    banned_tokens,
    decode_one_token,
    decode_state,
    fill_blanks,
    generate_ids,
    new_cache,
    prefill,
)
from glm130b.generate.inputs import build_generation_batch
from glm130b.generate.strategies import BeamSearch, Greedy, Sampling
from tests.generate.helpers import HELD_OUT, TOK, full_forward_last_logits, tiny_glm
from tests.helpers import LONG_CONTEXT_TOKENS, ORACLE_TOKENS, load_fixture, long_context_model, oracle_model


# ------------------------------------------------------------------------------ engine vs full forward
@pytest.mark.parametrize("case", ["sat_basic_fp32", "sat04_glm130b_2d_fp32"])
def test_static_cache_logits_equal_full_forward_each_step(case):
    """Teacher-forced: prefill + decode_one_token over the static cache give, at every step and for
    every row of a batch of different lengths and mask kinds, the logits of a full forward."""
    model = oracle_model(case, hidden_dropout=0.0, attention_dropout=0.0)
    T = ORACLE_TOKENS
    contexts = [
        [11, 12, 13, T.gmask, T.sop],
        [31, T.mask, 35, 36, T.eos, T.sop],
        [51, 52, 53, 54, 55, 56, 57, 58, T.mask, T.eos, T.sop],
    ]
    forced = torch.randint(100, 900, (3, 6), generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    cache = new_cache(model, 3, 32)
    state = decode_state(contexts, T, cache.max_length, model.config.position_encoding == "2d", device)
    with torch.no_grad():
        logits = prefill(model, cache, contexts, T)
        for j in range(forced.shape[1]):
            sequences = [c + forced[b, :j].tolist() for b, c in enumerate(contexts)]
            torch.testing.assert_close(logits, full_forward_last_logits(model, sequences, T), atol=1e-4, rtol=1e-4)
            logits = decode_one_token(model, cache, forced[:, j : j + 1], torch.tensor(j), state)


@pytest.mark.parametrize("name, tolerance", [("sat_long_context_fp32", 1e-4), ("sat_long_context_fp16", 0.0625)])
def test_static_cache_decode_at_the_end_of_the_context_matches_the_official_class(name, tolerance):
    """Each sample of the long-context fixtures decoded as generation runs it: prefill up to <sop>
    into a 2048-slot cache, then the oracle's generated tokens one by one (positions up to 2047 for
    [gMASK], 2035 for the [MASK] span): the logits at <sop> and at every generated token equal the
    official class's (fp16: within one step at |logits| ~ 64, as the full-forward parity test)."""
    fixture = load_fixture(name)
    model = long_context_model(name)
    rows = fixture["rows"].tolist()
    T = LONG_CONTEXT_TOKENS
    for b, sequence in enumerate(fixture["input_ids"].long().tolist()):
        sop = sequence.index(T.sop)
        context, generated = sequence[: sop + 1], sequence[sop + 1 :]
        cache = new_cache(model, 1, 2048)
        state = decode_state([context], T, cache.max_length, False, torch.device("cpu"))
        ours = []
        with torch.no_grad():
            ours.append(prefill(model, cache, [context], T)[0])
            for j, token in enumerate(generated[:-1]):
                ours.append(decode_one_token(model, cache, torch.tensor([[token]]), torch.tensor(j), state)[0])
        expected = fixture["logits"][b, [rows.index(p) for p in range(sop, len(sequence) - 1)]].float()
        assert (torch.stack(ours) - expected).abs().max().item() <= tolerance


def test_compiled_decode_step_is_one_graph_for_the_whole_generation(monkeypatch):
    """fullgraph tracing succeeds and the step never recompiles: its shapes are static."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(
        gen,
        "_COMPILED_DECODE",
        torch.compile(decode_one_token, backend=counting_backend, fullgraph=True, dynamic=False),
    )
    model = tiny_glm(embedding_std=0.3).eval()
    contexts = [[7, 8, TOK.gmask, TOK.sop], [9, TOK.mask, 10, 11, TOK.eos, TOK.sop]]
    banned = banned_tokens(TOK, 16) + [TOK.eop, TOK.eos]
    eager = generate_ids(model, contexts, TOK, Greedy(), 7, banned=banned)
    compiled = generate_ids(model, contexts, TOK, Greedy(), 7, banned=banned, compile=True)
    assert compiled == eager
    assert len(graphs) == 1
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ beam search
def test_engine_beam_search_equals_exhaustive_search():
    """Vocabulary of 3 letters + 2 end tokens, 3 new tokens: 2 + 6 + 18 + 27 = 53 hypotheses, all
    held by 64 beams; the engine (KV cache reordered by parent beam) must return the best one."""
    model = tiny_glm(vocab=10, embedding_std=0.5, seed=3).eval()
    banned = banned_tokens(TOK, 10)  # leaves 5 eop, 6 eos, 7, 8, 9
    allowed = [t for t in range(10) if t not in banned]
    context = [7, 8, 9, 8, TOK.gmask, TOK.sop]
    ends, horizon, lp = (TOK.eop, TOK.eos), 3, 1.0

    def log_probs(prefix):
        logits = full_forward_last_logits(model, [context + list(prefix)], TOK)[0]
        logits[banned] = float("-inf")
        return torch.log_softmax(logits, -1)

    best, best_score = None, float("-inf")
    for n in range(1, horizon + 1):
        for seq in itertools.product(allowed, repeat=n):
            if any(t in ends for t in seq[:-1]) or (n < horizon and seq[-1] not in ends):
                continue
            logp = sum(log_probs(seq[:i])[seq[i]].item() for i in range(n))
            score = logp / ((5 + len(context) + n) / 6) ** lp
            if score > best_score:
                best, best_score = seq, score
    got = generate_ids(model, [context], TOK, BeamSearch(num_beams=64, length_penalty=lp), horizon, banned=banned)
    expected = [t for t in best if t not in ends]
    assert got == [expected]


# ------------------------------------------------------------------------------ a trained model
@pytest.mark.parametrize(
    "strategy",
    [
        Greedy(),
        Sampling(temperature=0.7, top_p=0.9, seed=1),
        Sampling(temperature=0.5, top_k=2, seed=2),
        BeamSearch(num_beams=3),
    ],
    ids=["greedy", "sample-top-p", "sample-top-k", "beam"],
)
def test_trained_model_solves_the_task_under_every_strategy(trained, strategy):
    _, spans = fill_blanks(trained, [c for c, _ in HELD_OUT], TOK, strategy, 6)
    right = sum(s == [t] for s, (_, t) in zip(spans, HELD_OUT))
    assert right >= 15, f"{right}/16 right"


def test_trained_model_greedy_with_cache_equals_recompute(trained):
    """Greedy decoding over the static cache, batched, equals a loop of full forwards that picks
    the argmax and stops at an end token."""
    contexts = [c + [TOK.sop] for c, _ in HELD_OUT[:6]]
    banned = banned_tokens(TOK, 16)
    got = generate_ids(trained, contexts, TOK, Greedy(), 6, banned=banned)
    for context, tokens in zip(contexts, got):
        expected = []
        for _ in range(6):
            logits = full_forward_last_logits(trained, [context + expected], TOK)[0]
            logits[banned] = float("-inf")
            t = int(logits.argmax())
            if t in (TOK.eop, TOK.eos):
                break
            expected.append(t)
        assert tokens == expected


def test_static_slot_inputs_are_validated(tiny_config):
    model = GLM(tiny_config).eval()
    T = ORACLE_TOKENS
    batch = build_generation_batch([[5, 6, T.gmask, T.sop]], T)
    cache = new_cache(model, 1, 8)
    with pytest.raises(InputError, match=r"attention_mask must have shape \(1, 1, 4, 8\)"):
        model(batch.input_ids, batch.position_ids, batch.attention_mask, kv_cache=cache, cache_slots=torch.arange(4))
    mask = torch.nn.functional.pad(batch.attention_mask, (0, 4), value=True)
    with pytest.raises(InputError, match=r"cache_slots must be 4 slot indices in \[0, 8\)"):
        model(batch.input_ids, batch.position_ids, mask, kv_cache=cache, cache_slots=torch.arange(6, 10))
    with pytest.raises(InputError, match="without a kv_cache"):
        model(batch.input_ids, batch.position_ids, mask, cache_slots=torch.arange(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_eager(trained):
    """On the GPU the compiled step (inductor, CUDA graphs) gives the eager tokens, for greedy
    batches and for beam search (whose cache is reordered in place between graph replays)."""
    model = tiny_glm(vocab=16)
    model.load_state_dict(trained.state_dict())
    model = model.cuda().eval()
    contexts = [c + [TOK.sop] for c, _ in HELD_OUT[:5]]
    for strategy in (Greedy(), BeamSearch(num_beams=3)):
        eager = generate_ids(model, contexts, TOK, strategy, 6)
        assert generate_ids(model, contexts, TOK, strategy, 6, compile=True) == eager
        assert generate_ids(model, contexts, TOK, strategy, 6, compile=True) == eager  # graph replayed
        assert eager == generate_ids(trained, contexts, TOK, strategy, 6)  # and the CPU's tokens


def test_compile_falls_back_to_graph_breaks_with_a_warning(monkeypatch):
    """A model that dynamo cannot trace as one graph still generates (compiled with breaks)."""

    def untraceable(*args):
        raise torch._dynamo.exc.Unsupported("a kernel dynamo cannot trace")

    compiled = []

    def fake_compile(fn, **options):
        compiled.append(options)
        return fn

    monkeypatch.setattr(gen, "_COMPILED_DECODE", untraceable)
    monkeypatch.setattr(gen.torch, "compile", fake_compile)
    model = tiny_glm(embedding_std=0.3).eval()
    contexts = [[7, 8, TOK.gmask, TOK.sop]]
    with pytest.warns(UserWarning, match="does not compile as one graph"):
        got = generate_ids(model, contexts, TOK, Greedy(), 4, compile=True)
    assert got == generate_ids(model, contexts, TOK, Greedy(), 4)
    assert compiled == [dict(mode="reduce-overhead", dynamic=False)]  # no fullgraph the second time
