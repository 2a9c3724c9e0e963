"""The continuous-batching engine: many requests decoded together, each as if it ran alone.

One thread owns the model and a RowSlotCache of `max_batch` rows (glm130b.serve.slots). Between two
decode steps it drops cancelled requests, prefills waiting sequences into free rows and frees the
rows of finished ones; each step feeds one token to every running row. A [MASK] prompt with several
blanks keeps its row and is prefilled again before each next blank (the official rule). Beam search
runs whole, alone, between two steps. Requests talk to the engine through `submit` (any thread) and
a sink called from the engine thread with TextDelta, SequenceDone and JobFailed events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glm130b.core.errors import GLMError, InputError
from glm130b.generate.decode import banned_tokens, end_tokens, fill_blanks
from glm130b.generate.inputs import sequence_positions
from glm130b.generate.prompts import Prompt
from glm130b.generate.strategies import BeamSearch, Sampling, TokenChooser
from glm130b.model.glm import GLM
from glm130b.serve import limits
from glm130b.serve.slots import RowSlotCache, decode_rows, prefill_rows
from glm130b.serve.text import SpanText

log = logging.getLogger("glm130b.serve")


class QueueFull(GLMError):
    """More sequences waiting than the engine's max_queue (HTTP 429)."""


class EngineClosed(GLMError):
    """The engine is draining for shutdown and takes no new work (HTTP 503)."""


# ---------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class DecodeOptions:
    """How one sequence is decoded. max_tokens counts per blank; temperature 0 is greedy; a seed
    makes sampling reproducible (each blank draws from a generator seeded afresh, as
    glm130b.generate does); `logprobs` asks for that many alternatives per token (0: the chosen
    token's own log-prob only); ignore_eos bans the end tokens, so every blank runs to max_tokens."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    beam: BeamSearch | None = None
    ignore_eos: bool = False  # end tokens banned: every blank runs to max_tokens (benchmarks)


@dataclass(frozen=True)
class SequenceSpec:
    prompt: Prompt  # glm130b.generate's parsed prompt: pieces, markers, context ids
    options: DecodeOptions
    index: int  # the choice index in the response


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] | None


@dataclass
class SequenceResult:
    blanks: list[str]  # the text of each blank, in order
    filled_text: str  # the prompt with each marker replaced by its blank
    finish_reason: str  # "stop" (end token or stop string) or "length", of the last blank
    completion_tokens: int
    logprobs: list[TokenLogprob] | None


@dataclass
class TextDelta:
    index: int
    blank: int
    text: str


@dataclass
class SequenceDone:
    index: int
    result: SequenceResult


@dataclass
class JobFailed:
    message: str


Event = TextDelta | SequenceDone | JobFailed


@dataclass(eq=False)
class Job:
    """The sequences of one request; `sink` receives their events in the engine thread."""

    sequences: list[SequenceSpec]
    sink: Callable[[Event], None]
    stream: bool = True  # False: no TextDelta events (a whole answer needs only SequenceDone)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # a consumer that went away must not stop the engine
            log.exception("dropping an event: the request's sink failed")


@dataclass(eq=False)
class _Sequence:
    """A sequence's decoding state while it waits or holds a cache row."""

    job: Job
    spec: SequenceSpec
    sequence: list[int]  # context ids, filled spans in place, no <sop>
    blanks: list[str] = field(default_factory=list)
    row: int | None = None
    needs_prefill: bool = True
    span: SpanText | None = None
    generated: int = 0  # tokens of the current blank fed so far
    context_length: int = 0  # the current blank's context + <sop>
    base: list[int] | int = 0  # position of the blank's token 0 (a pair with 2-D)
    step: list[int] | int = 0  # added per token: 1 after [gMASK], 0 in a [MASK] span
    chooser: TokenChooser | None = None
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    @property
    def options(self) -> DecodeOptions:
        return self.spec.options


def _assemble(prompt: Prompt, blanks: list[str]) -> str:
    out = [prompt.pieces[0]]
    for blank, piece in zip(blanks, prompt.pieces[1:]):
        out += [blank, piece]
    return "".join(out)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


# ---------------------------------------------------------------------------------- engine
class Engine:
    """Continuous batching over `max_batch` cache rows of `max_total_tokens` slots each.

    By default a step decodes rows 0..(highest busy row), rows being handed out lowest first, over
    the slots up to the longest row's, and the prompts admitted since the last step are prefilled
    together as one padded batch: a row's answer equals its answer alone up to floating-point
    rounding. batch_invariant=True makes it bit for bit: every step computes all max_batch rows
    (idle ones a dummy token) over every slot and each prompt is prefilled alone, so no row's
    arithmetic depends on the others (slower)."""

    def __init__(
        self,
        model: GLM,
        tokenizer,
        *,
        max_batch: int = limits.MAX_BATCH,
        max_total_tokens: int | None = None,
        max_queue: int = limits.MAX_QUEUE,
        batch_invariant: bool = False,
        on_step: Callable[[int, int, float], None] | None = None,
    ):
        cfg = model.config
        limit = cfg.max_sequence_length
        self.max_total_tokens = max_total_tokens or limit
        if not 2 <= self.max_total_tokens <= limit:
            raise InputError(
                f"max_total_tokens {self.max_total_tokens} must be in [2, {limit}] (the model's "
                "max_sequence_length): lower it"
            )
        if max_batch < 1 or max_queue < 1:
            raise InputError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be at least 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.specials = tokenizer.specials
        weight = model.transformer.word_embeddings.weight
        self.device = weight.device
        self.max_batch, self.max_queue, self.batch_invariant = max_batch, max_queue, batch_invariant
        self.two_d = cfg.position_encoding == "2d"
        self.cache = RowSlotCache(cfg, max_batch, self.max_total_tokens, dtype=weight.dtype, device=self.device)
        self.banned = banned_tokens(self.specials, cfg.vocab_size, tokenizer.vocab_size)
        self.ban = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.ban[self.banned] = True
        self.ends = set(end_tokens(self.specials))
        self.end_ids = torch.tensor(sorted(self.ends), device=self.device)
        self.logits = torch.zeros(max_batch, cfg.vocab_size, device=self.device)  # next-token logits per row
        self.on_step = on_step
        self.tokens_generated = 0
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._rows: list[_Sequence | None] = [None] * max_batch
        self._closing = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the caller's side (any thread) ------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._rows)

    @property
    def closing(self) -> bool:
        return self._closing

    def check_fits(self, prompt: Prompt, max_tokens: int) -> None:
        """Refuse a prompt whose blanks could outgrow a cache row (each pass adds a span)."""
        blanks = len(prompt.markers)
        need = len(prompt.context) + 1 + blanks * max_tokens
        if need > self.max_total_tokens:
            raise InputError(
                f"the prompt has {len(prompt.context) + 1} tokens (with its mask, eos and <sop>) and "
                f"asks for up to {max_tokens} tokens for each of its {blanks} blank(s): {need} in all, "
                f"more than this server's limit of {self.max_total_tokens} tokens per sequence; "
                "lower max_tokens or shorten the prompt"
            )

    def submit(self, sequences: list[SequenceSpec], sink: Callable[[Event], None], stream: bool = True) -> Job:
        if len(sequences) > self.max_queue:
            raise InputError(
                f"the request asks for {len(sequences)} sequences (prompts x n); this server queues "
                f"at most {self.max_queue}: send fewer prompts or a smaller n"
            )
        for spec in sequences:
            self.check_fits(spec.prompt, spec.options.max_tokens)
        job = Job(sequences, sink, stream)
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down and takes no new requests; retry on another replica")
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting (the limit is {self.max_queue}); retry later"
                )
            self._waiting.extend(_Sequence(job, spec, list(spec.prompt.context)) for spec in sequences)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job's sequences (a client that went away): their rows are freed before the next step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def start(self) -> Engine:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._thread = threading.Thread(target=self._loop, name="glm130b-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new work, let running and waiting sequences finish (up to `timeout` s), then end."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            while self._busy() and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    # -- the engine thread --------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._waiting) or self.running > 0

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                if self._stopping:
                    self._fail_all("the server stopped before this request finished")
                    return
                if not self._busy():
                    self._cond.wait(0.5)
                    continue
                beam = self._admit()
            started, before, rows = time.perf_counter(), self.tokens_generated, 0
            if beam is not None:
                try:
                    self._run_beam(beam)
                except Exception as err:  # fail that request, keep serving
                    log.exception("beam search failed")
                    beam.job.cancelled = True
                    beam.job.emit(JobFailed(f"generation failed: {type(err).__name__}: {err}"))
            try:
                rows = self._step()
            except Exception as err:  # fail the batch, keep serving
                log.exception("decode step failed")
                with self._cond:
                    self._fail_running(f"generation failed: {type(err).__name__}: {err}")
            if self.on_step is not None:
                self.on_step(rows, self.tokens_generated - before, time.perf_counter() - started)
            with self._cond:
                self._cond.notify_all()  # stop() waits for the engine to go idle

    def _drop_cancelled(self) -> None:
        self._waiting = deque(s for s in self._waiting if not s.job.cancelled)
        for row, seq in enumerate(self._rows):
            if seq is not None and seq.job.cancelled:
                self._rows[row] = None

    def _admit(self) -> _Sequence | None:
        """Fill free rows from the queue, in order; a beam sequence at the head is returned to run alone."""
        while self._waiting:
            if self._waiting[0].options.beam is not None:
                return self._waiting.popleft()
            if None not in self._rows:
                return None
            seq = self._waiting.popleft()
            seq.row = self._rows.index(None)  # the lowest free row keeps the computed prefix short
            self._rows[seq.row] = seq
        return None

    def _fail_running(self, message: str) -> None:
        for row, seq in enumerate(self._rows):
            if seq is not None:
                self._rows[row] = None
                seq.job.cancelled = True
                seq.job.emit(JobFailed(message))

    def _fail_all(self, message: str) -> None:
        self._fail_running(message)
        for seq in self._waiting:
            if not seq.job.cancelled:
                seq.job.cancelled = True
                seq.job.emit(JobFailed(message))
        self._waiting.clear()

    def _prefill(self, group: list[_Sequence]) -> None:
        """Prefill a group of rows in one forward (one at a time when batch_invariant)."""
        contexts = [seq.sequence + [self.specials.sop] for seq in group]
        logits = prefill_rows(self.model, self.cache, [seq.row for seq in group], contexts, self.specials)
        pad = self.specials.pad
        for seq, context, row_logits in zip(group, contexts, logits):
            self.logits[seq.row] = row_logits
            pos = sequence_positions(context + [pad, pad], self.specials, self.two_d)  # [n + 2] or [2, n + 2]
            seq.base, seq.step = pos[..., -2].tolist(), (pos[..., -1] - pos[..., -2]).tolist()
            seq.context_length, seq.generated = len(context), 0
            seq.span = SpanText(self.tokenizer.decode, seq.options.stop)
            o = seq.options
            seq.chooser = None
            if o.temperature > 0:  # a fresh generator per blank, as glm130b.generate's fill does
                seq.chooser = TokenChooser(Sampling(o.temperature, o.top_k, o.top_p, o.seed), 1, self.device)
            seq.needs_prefill = False

    def _step(self) -> int:
        """Prefill the rows that need it, choose every busy row's token, decode; returns the busy rows."""
        waiting = [seq for seq in self._rows if seq is not None and seq.needs_prefill]
        for group in [[seq] for seq in waiting] if self.batch_invariant else [waiting] if waiting else []:
            self._prefill(group)
        busy = [seq for seq in self._rows if seq is not None]
        if not busy:
            return 0
        n = self.max_batch if self.batch_invariant else max(s.row for s in busy) + 1
        logits = self.logits[:n].masked_fill(self.ban, float("-inf"))
        ignoring_eos = [seq.row for seq in busy if seq.options.ignore_eos]
        if ignoring_eos:  # one indexed write for all of them: a write per row costs ~15 us each on a CPU
            rows = torch.tensor(ignoring_eos, device=self.device).view(-1, 1)
            logits[rows, self.end_ids] = float("-inf")
        chosen = logits.argmax(dim=-1)
        for seq in busy:
            if seq.chooser is not None:
                chosen[seq.row] = seq.chooser(logits[seq.row : seq.row + 1])[0]
        tokens = chosen.tolist()  # the one device-to-host read of the step
        feed: dict[int, _Sequence] = {}
        for seq in busy:
            if self._advance(seq, tokens[seq.row], logits):
                feed[seq.row] = seq
        if feed:
            self._decode(feed)
        return len(busy)

    def _decode(self, feed: dict[int, _Sequence]) -> None:
        n = self.max_batch if self.batch_invariant else max(feed) + 1
        idle = [0, 0] if self.two_d else 0
        tokens, positions, slots = [self.specials.pad] * n, [idle] * n, [0] * n  # idle rows: a pad at slot 0
        for row, seq in feed.items():
            j = seq.generated - 1  # the token just chosen is generated token j of this blank
            tokens[row] = seq.span.tokens[-1]
            if self.two_d:
                positions[row] = [b + j * s for b, s in zip(seq.base, seq.step)]
            else:
                positions[row] = seq.base + j * seq.step
            slots[row] = seq.context_length + j
        self.logits[:n] = decode_rows(self.model, self.cache, tokens, positions, slots, self.batch_invariant)

    def _advance(self, seq: _Sequence, token: int, logits: torch.Tensor) -> bool:
        """Take the row's chosen token; True when the row goes on to the next decode step."""
        if token in self.ends:
            return self._end_blank(seq, "stop")
        seq.generated += 1
        seq.completion_tokens += 1
        self.tokens_generated += 1
        if seq.options.logprobs is not None:
            self._record_logprob(seq, token, logits[seq.row])
        stopped = seq.span.add(token)
        if stopped:
            return self._end_blank(seq, "stop")
        self._emit_delta(seq)
        if seq.generated >= seq.options.max_tokens:
            return self._end_blank(seq, "length")
        return True

    def _record_logprob(self, seq: _Sequence, token: int, logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits, dim=-1)
        top = None
        if seq.options.logprobs:
            values, ids = torch.topk(logp, seq.options.logprobs)
            top = {self.tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist())}
        seq.logprobs = seq.logprobs or []
        seq.logprobs.append(TokenLogprob(self.tokenizer.decode([token]), float(logp[token]), top))

    def _emit_delta(self, seq: _Sequence) -> None:
        if not seq.job.stream:
            return
        text = seq.span.delta()
        if text:
            seq.job.emit(TextDelta(seq.spec.index, len(seq.blanks), text))

    def _end_blank(self, seq: _Sequence, reason: str) -> bool:
        seq.span.finish()
        self._emit_delta(seq)
        span = seq.span.tokens
        if seq.span.stopped:  # the text was cut inside the span: its ids are those of the kept text
            span = self.tokenizer.encode(seq.span.text)[: len(span)]
        self._fill(seq, span, seq.span.text, reason)
        return False

    def _fill(self, seq: _Sequence, span: list[int], text: str, reason: str) -> None:
        """Put a finished blank in place; prefill the next blank or report the sequence done."""
        at = next(i for i, t in enumerate(seq.sequence) if t in self.specials.mask_ids)
        seq.sequence = seq.sequence[:at] + span + seq.sequence[at + 1 :]
        seq.blanks.append(text)
        seq.finish_reason = reason
        if len(seq.blanks) < len(seq.spec.prompt.markers):
            seq.needs_prefill = True  # keeps its row
            return
        if seq.row is not None:
            self._rows[seq.row] = None
        result = SequenceResult(
            seq.blanks, _assemble(seq.spec.prompt, seq.blanks), seq.finish_reason, seq.completion_tokens, seq.logprobs
        )
        seq.job.emit(SequenceDone(seq.spec.index, result))

    def _run_beam(self, seq: _Sequence) -> None:
        """Beam search through glm130b.generate's fill, alone; each blank is sent whole."""
        o = seq.options
        _, spans = fill_blanks(self.model, [seq.sequence], self.specials, o.beam, o.max_tokens, banned=self.banned)
        for span in spans[0]:
            text, stopped = _cut_at_stop(self.tokenizer.decode(span), o.stop)
            seq.completion_tokens += len(span)
            self.tokens_generated += len(span)
            if text and seq.job.stream:
                seq.job.emit(TextDelta(seq.spec.index, len(seq.blanks), text))
            reason = "stop" if stopped or len(span) < o.max_tokens else "length"
            self._fill(seq, self.tokenizer.encode(text)[: len(span)] if stopped else span, text, reason)
