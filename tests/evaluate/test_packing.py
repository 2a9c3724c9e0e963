"""Reference (1): the packed multiple-choice sequence (every choice a block after one context) gives
each choice the log-prob that one plain forward of `context + [M, sop] + choice[:-1]` gives it,
built by the generation engine's own input rule (glm130b.generate.inputs), in a padded batch of
items of different lengths. lm windows likewise."""

import random

import pytest
import torch

from glm130b.evaluate.packing import pack_choices, pack_window, score_batch
from glm130b.generate.inputs import build_generation_batch
from tests.evaluate.helpers import TOK, tiny_glm

TEXT_IDS = range(8, 8 + 27)  # space and letters


def plain_log_probs(model, context_and_mask: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log P(continuation[j]) from one forward of context + [sop] + continuation[:-1]."""
    sequence = context_and_mask + [TOK.sop] + continuation[:-1]
    batch = build_generation_batch([sequence], TOK)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(batch.input_ids, batch.position_ids, batch.attention_mask)[0].float(), -1)
    rows = range(len(context_and_mask), len(context_and_mask) + len(continuation))
    picked = [float(log_probs[r, t]) for r, t in zip(rows, continuation)]
    greedy = all(int(log_probs[r].argmax()) == t for r, t in zip(rows, continuation))
    return sum(picked), greedy


@pytest.mark.parametrize("gmask", [False, True], ids=["MASK", "gMASK"])
@pytest.mark.parametrize("single_token", [False, True], ids=["multi-token", "single-token"])
def test_packed_choices_equal_one_plain_forward_per_choice(gmask, single_token):
    model = tiny_glm()
    rng = random.Random(7)
    items = []
    for _ in range(5):  # contexts of different lengths, 2 to 5 choices of 1 to 4 tokens
        context = [rng.choice(TEXT_IDS) for _ in range(rng.randint(3, 20))]
        choices = [
            [rng.choice(TEXT_IDS) for _ in range(1 if single_token else rng.randint(1, 4))]
            for _ in range(rng.randint(2, 5))
        ]
        items.append((context, choices))
    sequences = [pack_choices(c, ch, TOK, gmask=gmask, single_token=single_token) for c, ch in items]
    packed = score_batch(model, sequences, TOK.pad)
    mask = TOK.gmask if gmask else TOK.mask
    for (context, choices), spans in zip(items, packed):
        assert len(spans) == len(choices)
        for choice, span in zip(choices, spans):
            expected, greedy = plain_log_probs(model, context + [mask], choice)
            assert span.log_prob == pytest.approx(expected, abs=1e-4)
            assert span.tokens == len(choice) and span.greedy == greedy
    if single_token:  # one <sop> for all the choices: the sequence is context + [M, sop]
        assert all(len(s.tokens) == len(c) + 2 for s, (c, _) in zip(sequences, items))


def test_a_choice_never_sees_another():
    """Changing one choice's tokens leaves every other choice's score unchanged."""
    model = tiny_glm()
    context, choices = [9, 10, 11, 12], [[13, 14, 15], [16, 17], [18, 19, 20]]
    before = score_batch(model, [pack_choices(context, choices, TOK, gmask=False, single_token=False)], TOK.pad)[0]
    changed = [choices[0], [30, 31, 32, 33], choices[2]]
    after = score_batch(model, [pack_choices(context, changed, TOK, gmask=False, single_token=False)], TOK.pad)[0]
    assert after[0].log_prob == pytest.approx(before[0].log_prob, abs=1e-5)
    assert after[2].log_prob == pytest.approx(before[2].log_prob, abs=1e-5)


def test_lm_window_equals_plain_forward():
    model = tiny_glm()
    rng = random.Random(3)
    prompt, text = [rng.choice(TEXT_IDS) for _ in range(30)], [rng.choice(TEXT_IDS) for _ in range(12)]
    [[span]] = score_batch(model, [pack_window(prompt, text, TOK)], TOK.pad)
    expected, _ = plain_log_probs(model, prompt + [TOK.gmask], text)
    assert span.log_prob == pytest.approx(expected, abs=1e-4) and span.tokens == len(text)


def test_causal_context_equals_a_plain_causal_forward():
    """unidirectional: context and [gMASK] read causally; each choice then sees them and itself,
    which for one choice is an ordinary left-to-right forward with positions 0, 1, 2, ..."""
    model = tiny_glm()
    context, choices = [9, 10, 11, 12, 13], [[14, 15, 16], [17, 18]]
    packed = score_batch(
        model, [pack_choices(context, choices, TOK, gmask=True, single_token=False, causal_context=True)], TOK.pad
    )[0]
    for choice, span in zip(choices, packed):
        tokens = torch.tensor([context + [TOK.gmask, TOK.sop] + choice[:-1]])
        n = tokens.shape[1]
        causal = ~torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(tokens, torch.arange(n).view(1, n), causal)[0], -1)
        rows = range(len(context) + 1, len(context) + 1 + len(choice))
        assert span.log_prob == pytest.approx(sum(float(log_probs[r, t]) for r, t in zip(rows, choice)), abs=1e-4)
