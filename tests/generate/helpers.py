"""Shared helpers of the generation tests: a letter tokenizer, tiny GLMs, a position-rule stub
model, the full-forward reference, and the toy tasks a tiny model is trained on."""

import random
import re

import torch

from glm130b import GLM, GLMConfig
from glm130b.generate.inputs import build_generation_batch
from glm130b.objective.loss import masked_lm_loss
from glm130b.tokenizer.specials import SpecialTokens

TOK = SpecialTokens(mask=1, gmask=2, smask=3, sop=4, eop=5, eos=6, pad=0)
LETTERS = "abcdefgh"  # ids 7..14


UNK = 7 + len(LETTERS)  # any other character; past the tokenizer's ids, so never generated


class CharTokenizer:
    """A stand-in for glm130b.tokenizer: one id per letter, specials at 0..6; whitespace gets no
    id (as SentencePiece's whitespace collapsing drops a lone trailing space), other characters UNK."""

    specials = TOK
    vocab_size = 7 + len(LETTERS)

    def encode(self, text):
        return [7 + LETTERS.index(c) if c in LETTERS else UNK for c in text if not c.isspace()]

    def encode_prompt(self, text):
        ids = []
        markers = {"[MASK]": TOK.mask, "[sMASK]": TOK.smask, "[gMASK]": TOK.gmask}
        for part in re.split(r"(\[[sg]?MASK\])", text):
            ids += [markers[part]] if part in markers else self.encode(part)
        return ids

    def fingerprint(self) -> str:
        return "char-tokenizer"  # a fixed name: the stub has no model file to hash

    def decode(self, ids):
        return "".join("?" if i == UNK else LETTERS[i - 7] if i >= 7 else f"<{i}>" for i in ids)


def tiny_glm(vocab=16, position_encoding="1d", seed=0, embedding_std=None):
    torch.manual_seed(seed)
    cfg = GLMConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=vocab,
        inner_hidden_size=128,
        max_sequence_length=48,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        position_encoding=position_encoding,
    )
    model = GLM(cfg)
    if embedding_std is not None:
        torch.nn.init.normal_(model.transformer.word_embeddings.weight, std=embedding_std)
    return model


def full_forward_last_logits(model, sequences, specials):
    batch = build_generation_batch(sequences, specials, model.config.position_encoding)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask)
    return logits[torch.arange(len(sequences)), batch.lengths - 1]


class PositionStub(torch.nn.Module):
    """A 'model' whose next token is a rule of the fed token and its position: <sop> at position p
    -> letter(p); letter(p) at p -> letter(p + 1); anything else -> <eop>. A [MASK] blank at
    position p therefore fills with letter(p) letter(p + 1)."""

    def __init__(self):
        super().__init__()
        self.config = GLMConfig(
            num_layers=1, hidden_size=8, num_attention_heads=1, vocab_size=16, max_sequence_length=64
        )
        self.transformer = torch.nn.Module()
        self.transformer.word_embeddings = torch.nn.Embedding(16, 8)
        self.tensor_parallel_degree = 1  # as GLM: every head on this process

    def forward(
        self,
        input_ids,
        position_ids,
        attention_mask,
        kv_cache=None,
        check_inputs=True,
        cache_slots=None,
        logits_at=None,
    ):
        letter = 7 + position_ids % 8
        nxt = torch.where(
            input_ids == TOK.sop, letter, torch.where(input_ids == letter, 7 + (position_ids + 1) % 8, TOK.eop)
        )
        logits = torch.nn.functional.one_hot(nxt, 16).float() * 10
        if logits_at is not None:  # as GLM: only each row's position logits_at
            logits = logits[torch.arange(logits.shape[0]), logits_at].unsqueeze(1)
        return logits


def letter(p):
    return LETTERS[p % 8]


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


def train_reverser():
    model = tiny_glm(vocab=16, embedding_std=0.02)
    return fit_spans(model, task, TOK)


def fit_spans(model: GLM, draw_sample, specials: SpecialTokens, steps: int = 300, seed: int = 0) -> GLM:
    """Train `model` on batches of 32 `draw_sample(rng)` -> (context ids, span ids), the loss on the
    span and its <eop> as generation fills one (AdamW, one-cycle rate up to 5e-3); returns it in
    eval mode."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        samples = [draw_sample(rng) for _ in range(32)]
        batch = build_generation_batch([c + [specials.sop] + t for c, t in samples], specials)
        targets = torch.zeros_like(batch.input_ids)
        weights = torch.zeros(batch.input_ids.shape)
        for b, (c, t) in enumerate(samples):
            targets[b, len(c) : len(c) + len(t) + 1] = torch.tensor(t + [specials.eop])
            weights[b, len(c) : len(c) + len(t) + 1] = 1.0
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask, check_inputs=False)
        loss = masked_lm_loss(logits, targets, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


HELD_OUT = [task(random.Random(100 + i)) for i in range(16)]
