"""The continuous-batching engine without HTTP: answers against full-forward recomputation (no KV
cache at all), requests joining and leaving a running batch, seeded sampling against
glm130b.generate, cancellation, limits, and the streamed text of a span."""

import queue
import random
import time

import pytest
import torch

from glm130b.core.errors import InputError
from glm130b.generate.api import generate
from glm130b.generate.inputs import build_generation_batch
from glm130b.generate.prompts import parse_prompt
from glm130b.generate.strategies import BeamSearch, Sampling
from glm130b.serve.engine import DecodeOptions, Engine, JobFailed, QueueFull, SequenceDone, SequenceSpec, TextDelta
from glm130b.serve.slots import RowSlotCache, decode_rows
from glm130b.serve.text import SpanText

WAIT_S = 60  # generous: the whole engine test module runs in a few seconds on one core


def recompute_fill(model, tokenizer, text, max_tokens, ignore_eos=False, logprobs=None):
    """Greedy blanks by full forwards over the whole sequence at every token (the official rule:
    blanks left to right, the sequence rebuilt with each span in place); no KV cache involved.
    A list passed as `logprobs` receives each generated token's log-prob."""
    specials = tokenizer.specials
    ends = {specials.eop, specials.eos}
    banned = (
        set(specials.mask_ids)
        | {specials.sop, specials.pad}
        | set(range(tokenizer.vocab_size, model.config.vocab_size))
    )
    if ignore_eos:
        banned |= ends
    prompt = parse_prompt(text, tokenizer)
    sequence, blanks = list(prompt.context), []
    for _ in prompt.markers:
        context, span = sequence + [specials.sop], []
        for _ in range(max_tokens):
            batch = build_generation_batch([context + span], specials)
            with torch.no_grad():
                logits = model(batch.input_ids, batch.position_ids, batch.attention_mask)[0, -1]
            logits[sorted(banned)] = float("-inf")
            token = int(logits.argmax())
            if token in ends:
                break
            span.append(token)
            if logprobs is not None:
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        at = next(i for i, t in enumerate(sequence) if t in specials.mask_ids)
        sequence = sequence[:at] + span + sequence[at + 1 :]
        blanks.append(tokenizer.decode(span))
    return blanks


class Collector:
    """The events of the jobs submitted with `sink`, gathered from the engine thread."""

    def __init__(self):
        self.events = queue.Queue()
        self.deltas, self.results, self.failures = {}, {}, []

    def sink(self, tag):
        return lambda event: self.events.put((tag, event))

    def pump(self, until, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        while not until():
            tag, event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(event, TextDelta):
                self.deltas.setdefault(tag, []).append(event)
            elif isinstance(event, SequenceDone):
                self.results[tag] = event.result
            elif isinstance(event, JobFailed):
                self.failures.append((tag, event.message))


def spec(tokenizer, text, index=0, **options):
    return SequenceSpec(parse_prompt(text, tokenizer), DecodeOptions(**{"max_tokens": 8, **options}), index)


# Prompts of every kind, with different lengths and durations: [gMASK] continuations, [MASK]
# blanks (one or two), and ignore_eos rows that run to their max_tokens.
WAVES = [
    [("abc", {}), ("bc[MASK]f", {}), ("abcdefgh", {"ignore_eos": True, "max_tokens": 14})],
    [("a[MASK]d[MASK]h", {}), ("hgf", {"ignore_eos": True, "max_tokens": 5}), ("ab[MASK]e", {})],
    [("deg", {}), ("cd[MASK]h", {"ignore_eos": True, "max_tokens": 6}), ("b[MASK]e", {}), ("fed", {})],
]


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["default", "batch-invariant"])
def test_requests_joining_a_running_batch_get_the_recomputed_answers(reference, batch_invariant):
    """Three waves of prompts, each submitted once the previous one is decoding, through 3 rows
    (so sequences wait, take freed rows and join mid-flight): every answer equals greedy decoding
    by full forwards without a cache."""
    model, tokenizer = reference
    engine = Engine(model, tokenizer, max_batch=3, max_queue=16, batch_invariant=batch_invariant).start()
    try:
        got = Collector()
        for w, wave in enumerate(WAVES):
            for i, (text, options) in enumerate(wave):
                engine.submit([spec(tokenizer, text, **options)], got.sink((w, i)))
            if w + 1 < len(WAVES):  # the next wave arrives while this one decodes
                got.pump(lambda w=w: any(tag[0] == w for tag in got.deltas) or len(got.results) > 0)
        total = sum(map(len, WAVES))
        got.pump(lambda: len(got.results) == total)
        assert got.failures == []
        for w, wave in enumerate(WAVES):
            for i, (text, options) in enumerate(wave):
                expected = recompute_fill(
                    model, tokenizer, text, options.get("max_tokens", 8), options.get("ignore_eos", False)
                )
                result = got.results[(w, i)]
                assert result.blanks == expected, (text, options)
                assert "".join(d.text for d in got.deltas.get((w, i), [])) == "".join(expected)
        assert engine.running == 0 and engine.queue_length == 0
    finally:
        engine.stop()


def test_every_token_log_prob_equals_a_full_forward(reference):
    """Rows of different lengths and kinds decoding together: the log-prob of every generated
    token (prefill and each decode step, slots and positions per row) equals a full forward's."""
    model, tokenizer = reference
    prompts = [("abcdefgh", 12), ("b[MASK]e", 5), ("a[MASK]d[MASK]h", 4), ("hg", 16)]
    engine = Engine(model, tokenizer, max_batch=4)
    got = Collector()
    for k, (text, n) in enumerate(prompts):
        engine.submit([spec(tokenizer, text, max_tokens=n, ignore_eos=True, logprobs=0)], got.sink(k))
    engine.start()
    try:
        got.pump(lambda: len(got.results) == len(prompts))
    finally:
        engine.stop()
    for k, (text, n) in enumerate(prompts):
        expected = []
        blanks = recompute_fill(model, tokenizer, text, n, ignore_eos=True, logprobs=expected)
        assert got.results[k].blanks == blanks
        torch.testing.assert_close([x.logprob for x in got.results[k].logprobs], expected, atol=1e-4, rtol=0)


def test_seeded_sampling_is_the_same_alone_or_batched_and_equals_generate(reference):
    """A seeded request draws the same text alone and among other requests, and the text
    glm130b.generate draws with that seed (one prompt, a generator seeded afresh per blank)."""
    model, tokenizer = reference
    prompts = ["abc", "a[MASK]d[MASK]h"]
    options = dict(temperature=1.5, top_p=0.95, top_k=6, seed=11, max_tokens=10)
    engine = Engine(model, tokenizer, max_batch=4).start()
    try:
        alone = Collector()
        for k, text in enumerate(prompts):
            engine.submit([spec(tokenizer, text, **options)], alone.sink(k))
            alone.pump(lambda k=k: k in alone.results)
        crowd = Collector()
        others = [("hgf", dict(temperature=2.0, seed=3)), ("bc[MASK]f", {}), ("cde", dict(temperature=0.7))]
        for k, (text, extra) in enumerate(others):
            engine.submit([spec(tokenizer, text, **extra)], crowd.sink(("other", k)))
        for k, text in enumerate(prompts):
            engine.submit([spec(tokenizer, text, **options)], crowd.sink(k))
        crowd.pump(lambda: len(crowd.results) == len(prompts) + len(others))
    finally:
        engine.stop()
    strategy = Sampling(temperature=1.5, top_p=0.95, top_k=6, seed=11)
    for k, text in enumerate(prompts):
        expected = generate(model, tokenizer, text, strategy, 10)[0]
        assert alone.results[k].blanks == crowd.results[k].blanks == expected.blanks
        assert alone.results[k].filled_text == expected.text


def test_beam_search_runs_alone_between_steps_and_equals_generate(reference):
    model, tokenizer = reference
    engine = Engine(model, tokenizer, max_batch=2).start()
    try:
        got = Collector()
        engine.submit([spec(tokenizer, "abcdefgh", ignore_eos=True, max_tokens=12)], got.sink("greedy"))
        got.pump(lambda: "greedy" in got.deltas)
        engine.submit([spec(tokenizer, "a[MASK]d[MASK]h", beam=BeamSearch(num_beams=3))], got.sink("beam"))
        got.pump(lambda: len(got.results) == 2)
    finally:
        engine.stop()
    assert (
        got.results["beam"].blanks
        == generate(model, tokenizer, "a[MASK]d[MASK]h", BeamSearch(num_beams=3), 8)[0].blanks
    )
    assert got.results["greedy"].blanks == recompute_fill(model, tokenizer, "abcdefgh", 12, ignore_eos=True)


def test_a_cancelled_request_frees_its_row_for_the_next(reference):
    """One row: a 400-token request is cancelled at its first text; the queued request behind it
    then runs, and the cancelled one never finishes."""
    model, tokenizer = reference
    engine = Engine(model, tokenizer, max_batch=1)
    try:
        got = Collector()

        def cancel_at_first_text(event):
            if isinstance(event, TextDelta):
                engine.cancel(job)
            got.events.put(("long", event))

        job = engine.submit([spec(tokenizer, "abc", ignore_eos=True, max_tokens=400)], cancel_at_first_text)
        engine.submit([spec(tokenizer, "bc[MASK]f")], got.sink("next"))
        engine.start()
        got.pump(lambda: "next" in got.results)
        time.sleep(0.1)  # any event the long job still had in flight
        got.pump(lambda: got.events.empty())
    finally:
        engine.stop()
    assert "long" not in got.results
    assert len("".join(d.text for d in got.deltas["long"])) < 400
    assert got.results["next"].blanks == recompute_fill(model, tokenizer, "bc[MASK]f", 8)
    assert engine.running == 0


def test_batch_invariant_rows_are_bitwise_independent_of_the_others(reference):
    """With batch_invariant every step computes all rows and prompts are prefilled alone, so a
    row's log-probs are bit for bit those it gets alone, whatever else runs."""
    model, tokenizer = reference
    engine = Engine(model, tokenizer, max_batch=4, batch_invariant=True).start()
    options = dict(ignore_eos=True, max_tokens=10, logprobs=2)
    try:
        alone = Collector()
        engine.submit([spec(tokenizer, "abc", **options)], alone.sink(0))
        alone.pump(lambda: 0 in alone.results)
        crowd = Collector()
        for k, text in enumerate(["hgfedcba", "b[MASK]e", "cab"]):
            engine.submit([spec(tokenizer, text, temperature=1.0, seed=k)], crowd.sink(("other", k)))
        engine.submit([spec(tokenizer, "abc", **options)], crowd.sink(0))
        crowd.pump(lambda: len(crowd.results) == 4)
    finally:
        engine.stop()
    a, b = alone.results[0].logprobs, crowd.results[0].logprobs
    assert [(x.token, x.logprob, x.top) for x in a] == [(x.token, x.logprob, x.top) for x in b]
    logp = [x.logprob for x in a]
    assert all(p <= 0 for p in logp) and len(logp) == 10


def test_limits_are_refused_with_the_numbers(reference):
    model, tokenizer = reference
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2, max_total_tokens=32)  # not started: nothing runs
    with pytest.raises(
        InputError,
        match=r"asks for up to 10 tokens for each of its 2 blank\(s\): 31 in all, "
        r"more than this server's limit of 30",
    ):
        Engine(model, tokenizer, max_total_tokens=30).submit(
            [spec(tokenizer, "a[MASK]bcdefgh[MASK]", max_tokens=10)], print
        )
    engine.submit([spec(tokenizer, "abc")], print)
    engine.submit([spec(tokenizer, "abc")], print)
    with pytest.raises(QueueFull, match="2 sequences are waiting"):
        engine.submit([spec(tokenizer, "abc")], print)
    with pytest.raises(InputError, match="asks for 3 sequences"):
        engine.submit([spec(tokenizer, "abc", index=i) for i in range(3)], print)
    with pytest.raises(InputError, match="max_total_tokens 600 must be in"):
        Engine(model, tokenizer, max_total_tokens=600)


# ---------------------------------------------------------------------------------- span text
def _stream(pieces, decode, stop):
    span, shown = SpanText(decode, stop), []
    for token in pieces:
        stopped = span.add(token)
        shown.append(span.delta())
        if stopped:
            break
    span.finish()
    shown.append(span.delta())
    return span, shown


def test_span_text_deltas_join_to_the_text_cut_at_the_first_completed_stop():
    """Random letter streams and stop strings: the deltas never show text that is later taken
    back, and join to the reference: the text up to the first stop string, found at the first
    prefix that completes one."""
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stop = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 3)))
        expected = text
        for k in range(1, len(text) + 1):
            hits = [text[:k].find(s) for s in stop if s in text[:k]]
            if hits:
                expected = text[: min(hits)]
                break
        span, shown = _stream(list(text), lambda tokens: "".join(tokens), stop)
        assert "".join(shown) == span.text == expected, (text, stop)


def test_span_text_holds_back_an_incomplete_character():
    """Tokens are UTF-8 bytes: a partly decoded character (U+FFFD) is never shown."""
    text = "añ中b€"
    span, shown = _stream(list(text.encode()), lambda tokens: bytes(tokens).decode("utf-8", errors="replace"), ())
    assert "".join(shown) == text and all("\ufffd" not in s for s in shown)


# ---------------------------------------------------------------------------------- cache rows
def test_a_decode_step_reads_no_slot_past_the_longest_row(reference):
    """Rows at slots 3 and 20 attend over the first 32 slots (20 + 1 rounded up to 16s): slots
    beyond hold NaN here, which any read would spread, and the logits still equal those of a step
    over every slot of a clean cache."""
    model, _ = reference
    cfg = model.config
    caches = [RowSlotCache(cfg, 2, cfg.max_sequence_length) for _ in range(2)]
    for cache in caches:
        for buffer in cache.keys + cache.values:
            buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(1)))
    for buffer in caches[0].keys + caches[0].values:
        buffer[:, :, 32:] = float("nan")
    assert cfg.max_sequence_length > 32
    windowed, full = (
        decode_rows(model, cache, [5, 7], [3, 20], [3, 20], full_window=full_window)
        for cache, full_window in zip(caches, (False, True))
    )
    assert torch.isfinite(windowed).all()
    torch.testing.assert_close(windowed, full)
