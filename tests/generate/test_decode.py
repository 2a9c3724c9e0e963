"""The generation engine: static-cache decoding against full forwards, beam search against
exhaustive search, blank infilling, a tiny trained model under every strategy, the command line."""

import itertools
import random
import re

import pytest
import torch

import glm130b.generate.decode as gen
from glm130b import GLM, GLMConfig
from glm130b.core.errors import InputError
from glm130b.generate.decode import (
    banned_tokens,
    decode_one_token,
    decode_state,
    fill_blanks,
    generate,
    generate_ids,
    generate_text,
    new_cache,
    prefill,
    stream_text,
)
from glm130b.generate.inputs import build_generation_batch
from glm130b.generate.strategies import BeamSearch, Greedy, Sampling
from glm130b.objective.loss import masked_lm_loss
from glm130b.tokenizer.specials import SpecialTokens
from tests.helpers import ORACLE_TOKENS, oracle_model

TOK = SpecialTokens(mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6, pad=0)
LETTERS = "abcdefgh"  # ids 7..14


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids oversubscribing a shared CPU (a 2-thread matmul
    of this size can be 100x slower than 1 thread when the cores are busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CharTokenizer:
    """A stand-in for glm130b.tokenizer: one id per letter, specials at 0..6."""

    specials = TOK
    vocab_size = 7 + len(LETTERS)

    def encode(self, text):
        return [7 + LETTERS.index(c) for c in text]

    def encode_prompt(self, text):
        ids = []
        markers = {"[MASK]": TOK.mask, "[sMASK]": TOK.smask, "[gMASK]": TOK.gmask}
        for part in re.split(r"(\[[sg]?MASK\])", text):
            ids += [markers[part]] if part in markers else self.encode(part)
        return ids

    def decode(self, ids):
        return "".join(LETTERS[i - 7] if i >= 7 else f"<{i}>" for i in ids)


def tiny_glm(vocab=16, position_encoding="1d", seed=0, embedding_std=None):
    torch.manual_seed(seed)
    cfg = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=vocab, inner_hidden_size=128,
                    max_sequence_length=48, hidden_dropout=0.0, attention_dropout=0.0,
                    position_encoding=position_encoding)
    model = GLM(cfg)
    if embedding_std is not None:
        torch.nn.init.normal_(model.transformer.word_embeddings.weight, std=embedding_std)
    return model


def full_forward_last_logits(model, sequences, specials):
    batch = build_generation_batch(sequences, specials, model.config.position_encoding)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask)
    return logits[torch.arange(len(sequences)), batch.lengths - 1]


# ------------------------------------------------------------------------------ engine vs full forward
@pytest.mark.parametrize("case", ["sat_basic_fp32", "sat04_glm130b_2d_fp32"])
def test_static_cache_logits_equal_full_forward_each_step(case):
    """Teacher-forced: prefill + decode_one_token over the static cache give, at every step and for
    every row of a batch of different lengths and mask kinds, the logits of a full forward."""
    model = oracle_model(case, hidden_dropout=0.0, attention_dropout=0.0)
    T = ORACLE_TOKENS
    contexts = [[11, 12, 13, T.gmask, T.sop], [31, T.mask, 35, 36, T.eos, T.sop],
                [51, 52, 53, 54, 55, 56, 57, 58, T.mask, T.eos, T.sop]]
    forced = torch.randint(100, 900, (3, 6), generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    cache = new_cache(model, 3, 32)
    state = decode_state(contexts, T, cache.max_length, model.config.position_encoding == "2d", device)
    with torch.no_grad():
        logits = prefill(model, cache, contexts, T)
        for j in range(forced.shape[1]):
            sequences = [c + forced[b, :j].tolist() for b, c in enumerate(contexts)]
            torch.testing.assert_close(logits, full_forward_last_logits(model, sequences, T), atol=1e-4, rtol=1e-4)
            logits = decode_one_token(model, cache, forced[:, j:j + 1], torch.tensor(j), state)


def test_compiled_decode_step_is_one_graph_for_the_whole_generation(monkeypatch):
    """fullgraph tracing succeeds and the step never recompiles: its shapes are static."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(gen, "_COMPILED_DECODE",
                        torch.compile(decode_one_token, backend=counting_backend, fullgraph=True, dynamic=False))
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


# ------------------------------------------------------------------------------ infilling
class PositionStub(torch.nn.Module):
    """A 'model' whose next token is a rule of the fed token and its position: <sop> at position p
    -> letter(p); letter(p) at p -> letter(p + 1); anything else -> <eop>. A [MASK] blank at
    position p therefore fills with letter(p) letter(p + 1)."""

    def __init__(self):
        super().__init__()
        self.config = GLMConfig(num_layers=1, hidden_size=8, num_attention_heads=1, vocab_size=16,
                                max_sequence_length=64)
        self.transformer = torch.nn.Module()
        self.transformer.word_embeddings = torch.nn.Embedding(16, 8)

    def forward(self, input_ids, position_ids, attention_mask, kv_cache=None, check_inputs=True, cache_slots=None):
        letter = 7 + position_ids % 8
        nxt = torch.where(input_ids == TOK.sop, letter,
                          torch.where(input_ids == letter, 7 + (position_ids + 1) % 8, TOK.eop))
        return torch.nn.functional.one_hot(nxt, 16).float() * 10


def letter(p):
    return LETTERS[p % 8]


def test_several_blanks_fill_left_to_right_and_reassemble():
    tok, stub = CharTokenizer(), PositionStub()
    prompts = ["ab[MASK]cd[MASK]e", "[MASK]h", "abc"]
    results = generate(stub, tok, prompts, Greedy(), 5)
    # prompt 0: first blank at index 2; it becomes 2 tokens, so the second [MASK] (index 5) moves to 6
    first, second = letter(2) + letter(3), letter(6) + letter(7)
    assert results[0].blanks == [first, second]
    assert results[0].text == "ab" + first + "cd" + second + "e"
    assert results[0].token_ids == tok.encode("ab" + first + "cd" + second + "e") + [TOK.eos]
    assert results[1].text == letter(0) + letter(1) + "h"
    # no marker: [gMASK] appended at index 3; <sop> at 4 -> letter(4), then letter(4) at 5 != letter(5)
    assert results[2].text == "abc" + letter(4)
    assert "".join(stream_text(stub, tok, prompts[0], Greedy(), 5)) == results[0].text


def test_prompt_errors_and_warnings():
    tok, stub = CharTokenizer(), PositionStub()
    with pytest.raises(InputError, match=r"unknown mask marker \[XMASK\]"):
        generate_text(stub, tok, "ab[XMASK]c")
    with pytest.raises(InputError, match=r"unknown mask marker \[mask\]"):
        generate_text(stub, tok, "ab[mask]c")
    with pytest.raises(InputError, match="mixes"):
        generate_text(stub, tok, "a[MASK]b[gMASK]")
    with pytest.raises(InputError, match="more than the model's context of 64"):
        generate_text(stub, tok, "a" * 70)
    with pytest.raises(InputError, match="no room is left"):
        generate_text(stub, tok, "a" * 62)  # + [gMASK] + <sop> = 64
    with pytest.warns(UserWarning, match="only 2 of the 10 new tokens"):
        generate_text(stub, tok, "a" * 60, max_new_tokens=10)
    with pytest.warns(UserWarning, match=r"\[sMASK\] was never trained"):
        generate_text(stub, tok, "ab[sMASK]c", max_new_tokens=4)
    with pytest.raises(InputError, match="must end with <sop>"):
        generate_ids(stub, [[7, TOK.gmask]], TOK)


# ------------------------------------------------------------------------------ a trained model
def task(rng):
    """Two tasks a 2-layer model learns in a few hundred steps: after [gMASK], reverse three
    letters ("abc" -> "cba"); in a [MASK] blank, complete an alphabet run up to the letter after
    the blank ("ab[MASK]f" -> "cde", 1 to 3 letters)."""
    if rng.random() < 0.5:
        s = [rng.randrange(7, 15) for _ in range(3)]
        return s + [TOK.gmask], s[::-1]
    gap = rng.randint(1, 3)
    start = rng.randrange(7, 13 - gap)  # the letter after the blank stays within a..h (id 14)
    return [start, start + 1, TOK.mask, start + 2 + gap, TOK.eos], list(range(start + 2, start + 2 + gap))


@pytest.fixture(scope="module")
def trained():
    return train_reverser()


def train_reverser():
    model = tiny_glm(vocab=16, embedding_std=0.02)
    rng = random.Random(0)
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        samples = [task(rng) for _ in range(32)]
        batch = build_generation_batch([c + [TOK.sop] + t for c, t in samples], TOK)
        targets = torch.zeros_like(batch.input_ids)
        weights = torch.zeros(batch.input_ids.shape)
        for b, (c, t) in enumerate(samples):  # the loss covers the span and its <eop>
            targets[b, len(c):len(c) + len(t) + 1] = torch.tensor(t + [TOK.eop])
            weights[b, len(c):len(c) + len(t) + 1] = 1.0
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask, check_inputs=False)
        loss = masked_lm_loss(logits, targets, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


HELD_OUT = [task(random.Random(100 + i)) for i in range(16)]


@pytest.mark.parametrize("strategy", [Greedy(), Sampling(temperature=0.7, top_p=0.9, seed=1),
                                      Sampling(temperature=0.5, top_k=2, seed=2), BeamSearch(num_beams=3)],
                         ids=["greedy", "sample-top-p", "sample-top-k", "beam"])
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


def test_text_api_stream_and_sampling_reproducible(trained):
    tok = CharTokenizer()
    assert generate_text(trained, tok, "abc", max_new_tokens=6) == "abccba"
    assert generate_text(trained, tok, "ab[MASK]f", "beam", max_new_tokens=6) == "abcdef"
    assert "".join(stream_text(trained, tok, "deg", max_new_tokens=6)) == "degged"
    pieces = list(stream_text(trained, tok, "bc[MASK]f", max_new_tokens=6))
    assert pieces == ["bc", "d", "e", "f"]  # prompt text, the blank letter by letter, the tail
    draw = lambda seed: generate(trained, tok, ["abc", "cd[MASK]h"], Sampling(temperature=2.0, seed=seed), 6)
    assert [r.text for r in draw(7)] == [r.text for r in draw(7)]


def test_command_line(trained, tmp_path, monkeypatch, capsys):
    from glm130b import cli
    from glm130b.checkpoint.model_dir import save_model
    from glm130b.generate import commands as generate_commands

    save_model(trained, tmp_path)
    (tmp_path / "tokenizer").mkdir()
    monkeypatch.setattr(generate_commands, "load_tokenizer", lambda path: CharTokenizer())
    ckpt = ["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "8"]
    assert cli.main(ckpt + ["abc", "cd[MASK]g"]) == 0
    assert capsys.readouterr().out.splitlines() == ["abccba", "cdefg"]
    assert cli.main(ckpt + ["--strategy", "beam", "cab"]) == 0
    assert capsys.readouterr().out.strip() == "cabbac"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("abc\nab[XMASK]\nab[MASK]e\n\n"))
    assert cli.main(ckpt) == 0
    captured = capsys.readouterr()
    assert captured.out.replace("> ", "").splitlines() == ["abccba", "abcde"]
    assert "unknown mask marker [XMASK]" in captured.err


def test_per_prompt_sampling_options_follow_their_rows_across_passes(trained):
    """Row 0 has two blanks, row 1 one: the second pass runs row 0 alone with its own options."""
    tok = CharTokenizer()
    prompts = ["abc[MASK]d[MASK]e", "fed"]
    per_row = generate(trained, tok, prompts, Sampling(temperature=[0.0, 0.0], top_k=[0, 3], seed=0), 6)
    greedy = generate(trained, tok, prompts, Greedy(), 6)
    assert [r.text for r in per_row] == [r.text for r in greedy]
    with pytest.raises(InputError, match="top_k has 2 values for 1 prompts"):
        generate(trained, tok, ["abc"], Sampling(top_k=[1, 2]), 6)


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


def test_command_line_quantized(trained, tmp_path, monkeypatch, capsys):
    """--quantized swaps the linears for INT4 QuantizedLinear and still answers (the prompt's text
    comes back first; the tiny model's answer may change under INT4)."""
    from glm130b import cli
    from glm130b.checkpoint.model_dir import save_model
    from glm130b.generate import commands as generate_commands
    save_model(trained, tmp_path)
    (tmp_path / "tokenizer").mkdir()
    monkeypatch.setattr(generate_commands, "load_tokenizer", lambda path: CharTokenizer())
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "4", "--quantized",
                     "--no-stream", "abc"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("abc") and 3 < len(out) <= 7 and set(out) <= set(LETTERS)


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
