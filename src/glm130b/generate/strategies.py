"""Decoding strategies (SPEC.md section 8): greedy, sampling, beam search.

A strategy is a small frozen dataclass of options; the decode loop (glm130b.generate.decode) asks
it for the next tokens from logits. Greedy and sampling run as tensor code with no device-to-host
copy per token; beam search keeps its finished hypotheses on the host. Where and why they differ
from the reference (per-row top-p, deterministic beams): docs/generation.md, "Strategies".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glm130b.core.config_io import check_field, check_positive_int
from glm130b.core.errors import InputError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Greedy:
    """The most likely token every step."""


@dataclass(frozen=True)
class Sampling:
    """Draw from softmax(logits / temperature) restricted to the top_k tokens (and those tied with
    the k-th) and then to the most likely of them while the mass before each is <= top_p
    (`filter_logits`). top_k 0 and top_p 1.0 switch a filter off; temperature 0 means greedy for
    that row. Each option may be one value or one per prompt. `seed` makes the draws reproducible
    (same seed, same prompts, same tokens). Defaults: the official scripts' (scripts/generate.sh:
    temperature 1.0, top_k 0, top_p 0.7)."""

    temperature: float | Sequence[float] = 1.0
    top_k: int | Sequence[int] = 0
    top_p: float | Sequence[float] = 0.7
    seed: int | None = None

    def __post_init__(self):
        for name, kind, ok, expected in (
            ("temperature", float, lambda v: v >= 0, "a number >= 0"),
            ("top_k", int, lambda v: v >= 0, "an integer >= 0"),
            ("top_p", float, lambda v: 0 < v <= 1, "in (0, 1]"),
        ):
            values = getattr(self, name)
            for value in values if isinstance(values, (list, tuple)) else [values]:
                check_field(name, value, kind, ok, expected)


@dataclass(frozen=True)
class BeamSearch:
    """Keep the num_beams most likely continuations (cumulative log-prob); a finished one scores
    score / ((5 + length) / 6) ** length_penalty, length counting the prompt as the reference does.
    No n-gram of no_repeat_ngram_size generated tokens occurs twice (0 = off); end tokens are
    banned before min_length tokens. draw_candidates=True draws the candidates at random, as the
    reference does (deterministic top candidates otherwise). Defaults: the official scripts'
    (scripts/generate.sh: 4 beams, length penalty 1.0, no-repeat-ngram 3, min length 0)."""

    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_length: int = 0
    draw_candidates: bool = False
    seed: int | None = None
    # The reference's evaluation choices, to reproduce its scores (glm130b.evaluate sets them): the
    # prompt counted padded to this multiple in the length penalty (its batches pad to 32); stopping
    # once num_beams beams ended and the worst beats the best running beam normalised at the
    # current length (a heuristic: the running beam might still win); token sequences banned as
    # the first generated tokens (LAMBADA bans punctuation).
    prompt_length_multiple: int = 1
    reference_stop: bool = False
    banned_prefixes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        check_positive_int("num_beams", self.num_beams)
        check_positive_int("prompt_length_multiple", self.prompt_length_multiple)
        check_field("length_penalty", self.length_penalty, float)
        for name in ("no_repeat_ngram_size", "min_length"):
            check_field(name, getattr(self, name), int, lambda v: v >= 0, "an integer >= 0")


Strategy = Greedy | Sampling | BeamSearch
STRATEGY_NAMES = {"greedy": Greedy, "sample": Sampling, "beam": BeamSearch}


def strategy_from_name(name: str, **options) -> Strategy:
    """`strategy_from_name("sample", temperature=0.7, top_p=0.9)`; options a strategy lacks are an error."""
    if name not in STRATEGY_NAMES:
        raise InputError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    try:
        return STRATEGY_NAMES[name](**options)
    except TypeError as err:
        raise InputError(f"strategy {name!r} does not take these options: {err}") from None


# ------------------------------------------------------------------------------ sampling
def per_row(value, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One option value per row [B], from a scalar or a sequence of batch values."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise InputError(
                f"a per-prompt option has {len(value)} values for {batch} prompts; give one value, or one per prompt"
            )
        return torch.tensor(value, dtype=dtype, device=device)
    return torch.full((batch,), value, dtype=dtype, device=device)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens outside each row's top-k / top-p set at -inf, by the official
    rule (SwissArmyTransformer's top_k_logits), applied per row.

    top_k [B] long (0 = no limit): every token whose logit is at least the k-th largest stays, so
    tokens tied with the k-th all stay. top_p [B] float (1.0 = no limit) acts on the distribution
    left after top-k: in descending order, token i stays while the mass before it is <= top_p (the
    first always stays; a token that brings the mass exactly to top_p is followed by one more).
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V).unsqueeze(-1)  # [B, 1]
    keep = sorted_logits >= sorted_logits.gather(-1, k - 1)  # ties with the k-th value stay
    probs = torch.softmax(sorted_logits.masked_fill(~keep, NEG_INF), dim=-1)
    # the mass before each token: the cumulative sum shifted right by one, as the reference does
    mass_before = F.pad(torch.cumsum(probs, dim=-1)[:, :-1], (1, 0))
    keep &= (mass_before <= top_p.unsqueeze(-1)) | (top_p.unsqueeze(-1) >= 1.0)
    keep_unsorted = torch.zeros_like(keep).scatter(-1, order, keep)
    return logits.masked_fill(~keep_unsorted, NEG_INF)


def draw_no_sync(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V] -> [B]. argmax(p / E) with E ~ Exp(1) picks i with
    probability p_i (the exponential race) without torch.multinomial's device-to-host sync."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=-1)


class TokenChooser:
    """Greedy or sampling choice of the next token of every row, options prepared once as tensors."""

    def __init__(self, strategy: Greedy | Sampling, batch: int, device: torch.device):
        self.greedy = isinstance(strategy, Greedy)
        self.generator = None
        if self.greedy:
            return
        self.temperature = per_row(strategy.temperature, batch, torch.float32, device)
        self.top_k = per_row(strategy.top_k, batch, torch.long, device)
        self.top_p = per_row(strategy.top_p, batch, torch.float32, device)
        self.argmax_rows = self.temperature == 0  # [B]: temperature 0 = greedy for that row
        self.generator = torch.Generator(device=device)
        if strategy.seed is not None:
            self.generator.manual_seed(strategy.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (float, banned tokens at -inf) -> next tokens [B] long."""
        best = torch.argmax(logits, dim=-1)
        if self.greedy:
            return best
        scaled = logits / torch.where(self.argmax_rows, 1.0, self.temperature).unsqueeze(-1)
        probs = torch.softmax(filter_logits(scaled, self.top_k, self.top_p), dim=-1)
        return torch.where(self.argmax_rows, best, draw_no_sync(probs, self.generator))


# ------------------------------------------------------------------------------ beam search
def length_normalized(score: float, length: int, length_penalty: float) -> float:
    """The reference's (OpenNMT's) length penalty: score / ((5 + length) / 6) ** length_penalty."""
    return score / ((5.0 + length) / 6.0) ** length_penalty


def repeated_ngram_bans(generated: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `generated`."""
    if n <= 0 or len(generated) < n - 1:
        return []
    if n == 1:
        return sorted(set(generated))
    prefix = tuple(generated[len(generated) - n + 1 :])
    return [generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i : i + n - 1]) == prefix]


@dataclass
class Hypothesis:
    score: float  # length-normalised cumulative log-prob
    tokens: list[int]  # generated tokens, the end token included when it ended on one
    log_prob: float  # cumulative log-prob


class BeamState:
    """Running beams and finished hypotheses of one prompt; `step` advances by one token.

    Running beams are rows of a batch of num_beams (the KV cache rows): the first step expands
    beam 0 only (all rows hold the same prompt). Candidates per step: (max(1, #end tokens) + 1) x
    num_beams, the reference's count, so that enough non-ending candidates remain; they are scanned
    best first, an end token finishing a hypothesis, another continuing a beam; once num_beams
    continue, the next non-ending candidate ends the scan (as the reference does).
    """

    def __init__(
        self,
        strategy: BeamSearch,
        prompt_length: int,
        max_new_tokens: int,
        end_tokens: Sequence[int],
        device: torch.device,
    ):
        self.s = strategy
        self.k = strategy.num_beams
        multiple = strategy.prompt_length_multiple
        self.prompt_length = -(-prompt_length // multiple) * multiple
        self.max_new_tokens = max_new_tokens
        self.end_tokens = list(end_tokens)
        self.scores = torch.full((self.k,), NEG_INF, device=device)
        self.scores[0] = 0.0
        self.beams: list[list[int]] = [[] for _ in range(self.k)]
        self.finished: list[Hypothesis] = []
        self.generator = None
        if strategy.draw_candidates:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(strategy.seed if strategy.seed is not None else 0)

    def _score(self, log_prob: float, new_tokens: int) -> float:
        return length_normalized(log_prob, self.prompt_length + new_tokens, self.s.length_penalty)

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """logits [K, V] (banned tokens at -inf) -> (parent rows [K], next tokens [K]), or None when
        the search is over."""
        logits = logits.float().clone()
        generated = len(self.beams[0])
        if generated < self.s.min_length:
            logits[:, self.end_tokens] = NEG_INF
        for prefix in self.s.banned_prefixes:
            if len(prefix) - 1 == generated:
                rows = [r for r, beam in enumerate(self.beams) if tuple(beam) == tuple(prefix[:-1])]
                logits[rows, prefix[-1]] = NEG_INF
        for row, beam in enumerate(self.beams):
            bans = repeated_ngram_bans(beam, self.s.no_repeat_ngram_size)
            if bans:
                logits[row, bans] = NEG_INF
        total = (self.scores.unsqueeze(1) + torch.log_softmax(logits, dim=-1)).view(-1)  # [K * V]
        n_candidates = min((max(1, len(self.end_tokens)) + 1) * self.k, total.numel())
        if self.generator is not None:
            weights = torch.softmax(total, dim=0)
            n_candidates = min(n_candidates, int((weights > 0).sum()))
            if n_candidates == 0:
                return self._finish()
            picked = torch.multinomial(weights, n_candidates, generator=self.generator)
            picked = picked[torch.argsort(total[picked], descending=True)]
        else:
            picked = torch.topk(total, n_candidates).indices
        vocab = logits.shape[-1]
        cand_scores = total[picked].tolist()
        parents_out, tokens_out, scores_out = [], [], []
        for index, score in zip(picked.tolist(), cand_scores):
            if score == NEG_INF:
                break
            parent, token = divmod(index, vocab)
            if token in self.end_tokens:
                tokens = self.beams[parent] + [token]
                self.finished.append(Hypothesis(self._score(score, len(tokens)), tokens, score))
            elif len(parents_out) < self.k:
                parents_out.append(parent), tokens_out.append(token), scores_out.append(score)
            else:  # as the reference: K beams continue, so the next other candidate ends the scan
                break  # and end candidates ranked below it are not kept
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.k :]
        if not parents_out:
            return self._finish()
        while len(parents_out) < self.k:  # fewer live candidates than beams: fill with dead rows
            parents_out.append(parents_out[0]), tokens_out.append(tokens_out[0]), scores_out.append(NEG_INF)
        self.beams = [self.beams[p] + [t] for p, t in zip(parents_out, tokens_out)]
        self.scores = torch.tensor(scores_out, device=self.scores.device)
        if len(self.beams[0]) >= self.max_new_tokens or self._cannot_improve():
            return self._finish()
        device = self.scores.device
        return torch.tensor(parents_out, device=device), torch.tensor(tokens_out, device=device)

    def _cannot_improve(self) -> bool:
        """True when num_beams hypotheses are finished and no running beam can beat the worst of
        them: its log-prob only falls with more tokens, so its best possible normalised score is
        its current log-prob under the most favourable length still reachable."""
        if len(self.finished) < self.k:
            return False
        best = float(self.scores.max())
        if best == NEG_INF:
            return True
        generated = len(self.beams[0])
        if self.s.reference_stop:
            bound = self._score(best, generated)
        elif self.s.length_penalty > 0:  # dividing a negative score by a larger factor raises it
            bound = self._score(best, self.max_new_tokens)
        else:
            bound = self._score(best, generated + 1)
        return self.finished[-1].score >= bound

    def _finish(self) -> None:
        """The beams still running at the horizon count as hypotheses (without an end token)."""
        if len(self.beams[0]) >= self.max_new_tokens:
            for beam, score in zip(self.beams, self.scores.tolist()):
                if score > NEG_INF:
                    self.finished.append(Hypothesis(self._score(score, len(beam)), beam, score))
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.k :]
        return None

    def best(self) -> list[int]:
        return self.hypotheses()[0]

    def hypotheses(self) -> list[list[int]]:
        """The finished hypotheses' tokens, best first (the best running beam when none ended)."""
        return [h.tokens for h in self.finished] if self.finished else [self.beams[0]]


__all__ = [
    "Greedy",
    "Sampling",
    "BeamSearch",
    "Strategy",
    "strategy_from_name",
    "filter_logits",
    "draw_no_sync",
    "TokenChooser",
    "BeamState",
    "length_normalized",
    "repeated_ngram_bans",
]
