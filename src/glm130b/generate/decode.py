"""The decode loop (SPEC.md sections 5 and 8), on token ids: `prefill` and `decode_one_token` over a
static KV cache, `iterate_tokens` and `generate_ids` for a batch of contexts (each ending in <sop>),
`fill_blanks` for every blank of every context, left to right. The design (static cache slots,
per-row positions, one compiled step replayed as a CUDA graph): docs/generation.md, "The engine".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from glm130b.core.config_io import check_positive_int
from glm130b.core.errors import InputError
from glm130b.generate.inputs import build_generation_batch, generation_mask, sequence_positions
from glm130b.generate.strategies import BeamSearch, BeamState, Greedy, Sampling, Strategy, TokenChooser
from glm130b.model.glm import GLM
from glm130b.model.kv_cache import KVCache
from glm130b.tokenizer.specials import SpecialTokens

# New tokens per blank unless asked otherwise, in the Python API and the CLI alike. The official
# scripts bound prompt and answer together (generate.sh: --out-seq-length 256, prompt included); a
# count of new tokens does not depend on the prompt's length, and 128 is half that budget.
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_STRATEGY = Greedy()  # the CLI's --strategy default too
# Cache lengths are rounded up to this, so prompts of similar lengths share one compiled decode step.
CACHE_LENGTH_MULTIPLE = 64
# How often (in tokens) a non-streaming loop reads `all rows ended?` from the device; each read is
# a sync, so it is not done every token.
DONE_CHECK_EVERY = 8


# ---------------------------------------------------------------------------------- tensors
@dataclass
class DecodeState:
    """Per-batch tensors the decode step reads (fixed for the whole generation)."""

    prompt_visible: torch.Tensor  # [B, T] bool: cache slots of each row's own prompt (pads False)
    gen_start: torch.Tensor  # [] long: slot of generated token 0 (the padded prompt length L)
    position_base: torch.Tensor  # [B] or [B, 2]: position of generated token 0
    position_step: torch.Tensor  # like position_base: added per generated token (1 or 0 per row)


def decode_state(
    contexts: list[list[int]], specials: SpecialTokens, cache_length: int, two_d: bool, device: torch.device
) -> DecodeState:
    """Positions come from glm130b.generate.inputs.sequence_positions, so they follow the same rule
    as a full forward: token 0 and 1 of a span give the base and the step."""
    L = max(len(c) for c in contexts)
    visible = torch.zeros(len(contexts), cache_length, dtype=torch.bool)
    base, step = [], []
    for b, context in enumerate(contexts):
        visible[b, : len(context)] = True
        pos = sequence_positions(context + [specials.pad, specials.pad], specials, two_d)  # [n + 2] or [2, n + 2]
        base.append(pos[..., -2])
        step.append(pos[..., -1] - pos[..., -2])
    return DecodeState(
        visible.to(device), torch.tensor(L, device=device), torch.stack(base).to(device), torch.stack(step).to(device)
    )


def new_cache(model: GLM, batch: int, length: int) -> KVCache:
    weight = model.transformer.word_embeddings.weight
    heads = model.config.num_attention_heads // model.tensor_parallel_degree  # this rank's share
    return _mark_static(KVCache(model.config, batch, length, dtype=weight.dtype, device=weight.device, num_heads=heads))


def _mark_static(cache: KVCache) -> KVCache:
    if cache.keys[0].is_cuda:
        # Static addresses: the compiled step mutates the cache in place and CUDA graphs replay
        # against these exact buffers (otherwise inductor skips graphs with mutated inputs).
        for buffer in cache.keys + cache.values:
            torch._dynamo.mark_static_address(buffer)
    return cache


def prefill(model: GLM, cache: KVCache, contexts: list[list[int]], specials: SpecialTokens) -> torch.Tensor:
    """Run the prompts (right-padded to L) into cache slots 0..L-1; logits at each row's last
    prompt token (its <sop>) [B, V] in fp32. Inputs are validated here, once."""
    cfg = model.config
    inputs = build_generation_batch(contexts, specials, cfg.position_encoding, cfg.max_sequence_length, cfg.vocab_size)
    device = cache.keys[0].device
    B, L = inputs.input_ids.shape
    mask = F.pad(inputs.attention_mask, (0, cache.max_length - L), value=True)  # [B, 1, L, T]
    slots = torch.arange(L, device=device)
    last = (inputs.lengths - 1).to(device)
    logits = model(
        inputs.input_ids.to(device),
        inputs.position_ids.to(device),
        mask.to(device),
        kv_cache=cache,
        cache_slots=slots,
        logits_at=last,
    )  # [B, 1, V]
    return logits[:, 0].float()


def decode_one_token(
    model: GLM, cache: KVCache, tokens: torch.Tensor, step: torch.Tensor, state: DecodeState
) -> torch.Tensor:
    """Feed generated token `step` of every row (tokens [B, 1]); logits for the next one [B, V] fp32.

    Static shapes throughout: the new keys go to slot L + step, the mask spans all T cache slots
    (a row sees its prompt and the generated slots L..L+step), nothing is read back to the host.
    """
    slot = state.gen_start + step  # []
    position = (state.position_base + step * state.position_step).unsqueeze(-1)  # [B, 1] or [B, 2, 1]
    cols = torch.arange(state.prompt_visible.shape[1], device=tokens.device)  # [T]
    visible = state.prompt_visible | ((cols >= state.gen_start) & (cols <= slot))  # [B, T]
    mask = ~visible[:, None, None, :]  # [B, 1, 1, T]
    logits = model(tokens, position, mask, kv_cache=cache, check_inputs=False, cache_slots=slot.view(1))
    return logits[:, -1].float()


_COMPILED_DECODE: Callable | None = None


def compiled_decode_one_token(*args) -> torch.Tensor:
    """decode_one_token compiled once per process (one graph per batch size and cache length):
    CUDA graphs on the GPU. If a module cannot be traced as one graph (a custom kernel dynamo does
    not support, say), it warns and compiles with graph breaks instead: still correct, slower."""
    global _COMPILED_DECODE
    if _COMPILED_DECODE is None:
        _COMPILED_DECODE = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)
    try:
        return _COMPILED_DECODE(*args)
    except torch._dynamo.exc.Unsupported as err:  # raised while tracing, before the cache is touched
        warnings.warn(
            f"the decode step does not compile as one graph ({str(err).splitlines()[0]}); "
            "compiling it with graph breaks",
            stacklevel=2,
        )
        _COMPILED_DECODE = torch.compile(decode_one_token, mode="reduce-overhead", dynamic=False)
        return _COMPILED_DECODE(*args)


# ---------------------------------------------------------------------------------- token ids
def end_tokens(specials: SpecialTokens) -> list[int]:
    return sorted({specials.eop, specials.eos})


def banned_tokens(specials: SpecialTokens, model_vocab: int, tokenizer_vocab: int | None = None) -> list[int]:
    """Ids never generated: the mask tokens and <sop> (a generated one would be taken for a new
    blank or span start when the sequence is rebuilt), pad, and the padding rows of the embedding
    past the tokenizer's vocabulary (GLM-130B pads 150008 ids to 150528 rows)."""
    ids = set(specials.mask_ids) | {specials.sop, specials.pad}
    if tokenizer_vocab is not None:
        ids |= set(range(tokenizer_vocab, model_vocab))
    return sorted(i for i in ids if 0 <= i < model_vocab)


def room_to_generate(model: GLM, contexts: list[list[int]], max_new_tokens: int) -> int:
    """max_new_tokens, lowered (with a warning) so prompt + generated fits max_sequence_length."""
    limit = model.config.max_sequence_length
    longest = max(len(c) for c in contexts)
    if longest > limit:
        raise InputError(
            f"the prompt has {longest} tokens (with its mask, eos and <sop>), more than the "
            f"model's context of {limit}; shorten it or cut the context on the left"
        )
    room = limit - longest
    if room < 1:
        raise InputError(
            f"the prompt fills the model's whole context ({limit} tokens): no room is left to generate; shorten it"
        )
    check_positive_int("max_new_tokens", max_new_tokens)
    if max_new_tokens > room:
        warnings.warn(
            f"only {room} of the {max_new_tokens} new tokens asked for fit after a {longest}-token "
            f"prompt in the {limit}-token context; generating at most {room}",
            stacklevel=3,
        )
    return min(max_new_tokens, room)


def _cache_length(model: GLM, contexts: list[list[int]], max_new_tokens: int) -> int:
    need = max(len(c) for c in contexts) + max_new_tokens
    rounded = -(-need // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    return min(rounded, model.config.max_sequence_length)


def _ban_mask(banned: Sequence[int], vocab: int, device) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[list(banned)] = True
    return mask


def iterate_tokens(
    model: GLM,
    contexts: list[list[int]],
    specials: SpecialTokens,
    strategy: Greedy | Sampling,
    max_new_tokens: int,
    banned: Sequence[int],
    compile: bool = False,
    check_every: int = DONE_CHECK_EVERY,
    min_new_tokens: int = 0,
    begin_suppress_tokens: Sequence[int] = (),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decoding of a batch under Greedy or Sampling; yields (tokens [B], ended_before [B]) on the device
    each step. A row that ended keeps yielding its end token; the loop stops after max_new_tokens
    or once every row has ended (read from the device every `check_every` steps). The end tokens
    are banned for the first `min_new_tokens` steps, `begin_suppress_tokens` at the first step
    (Hugging Face's options of those names)."""
    device = model.transformer.word_embeddings.weight.device
    B = len(contexts)
    cache = new_cache(model, B, _cache_length(model, contexts, max_new_tokens))
    state = decode_state(contexts, specials, cache.max_length, model.config.position_encoding == "2d", device)
    choose = TokenChooser(strategy, B, device)
    ban = _ban_mask(banned, model.config.vocab_size, device)
    ends = torch.tensor(end_tokens(specials), device=device)
    ban_with_ends = ban.clone()
    ban_with_ends[ends] = True
    ban_first = (ban_with_ends if min_new_tokens else ban).clone()
    ban_first[torch.tensor(list(begin_suppress_tokens), dtype=torch.long, device=device)] = True
    step_fn = compiled_decode_one_token if compile else decode_one_token
    steps = torch.arange(max_new_tokens, device=device)
    # no_grad around each call, not around the loop: a generator's grad mode would leak into the
    # caller's code between two yields.
    with torch.no_grad():
        logits = prefill(model, cache, contexts, specials)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    last = torch.full((B,), specials.eop, dtype=torch.long, device=device)
    for j in range(max_new_tokens):
        with torch.no_grad():
            banned_now = ban_first if j == 0 else ban_with_ends if j < min_new_tokens else ban
            tokens = choose(logits.masked_fill(banned_now, float("-inf")))
            tokens = torch.where(ended, last, tokens)  # an ended row stays ended
        yield tokens, ended
        last = tokens
        ended = ended | torch.isin(tokens, ends)
        if j == max_new_tokens - 1 or ((j + 1) % check_every == 0 and bool(ended.all())):
            return
        if compile and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            logits = step_fn(model, cache, tokens.view(B, 1), steps[j], state)


def _beam_search_one(
    model: GLM,
    context: list[int],
    specials: SpecialTokens,
    strategy: BeamSearch,
    max_new_tokens: int,
    banned: Sequence[int],
    compile: bool = False,
) -> list[list[int]]:
    """Beam search for one context: its num_beams beams are the rows of one batch (KV cache rows,
    reordered in place by parent beam each step). Returns the hypotheses' tokens, best first."""
    device = model.transformer.word_embeddings.weight.device
    K = strategy.num_beams
    cache = new_cache(model, 1, _cache_length(model, [context], max_new_tokens))
    with torch.no_grad():
        logits = prefill(model, cache, [context], specials).expand(K, -1)  # the prompt runs once
    cache.reorder(torch.zeros(K, dtype=torch.long, device=device))  # then K copies of its keys
    _mark_static(cache)
    state = decode_state([context] * K, specials, cache.max_length, model.config.position_encoding == "2d", device)
    ban = _ban_mask(banned, model.config.vocab_size, device)
    beams = BeamState(strategy, len(context), max_new_tokens, end_tokens(specials), device)
    step_fn = compiled_decode_one_token if compile else decode_one_token
    with torch.no_grad():
        for j in range(max_new_tokens):
            chosen = beams.step(logits.masked_fill(ban, float("-inf")))
            if chosen is None:
                break
            parents, tokens = chosen
            cache.reorder(parents)
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            logits = step_fn(model, cache, tokens.view(K, 1), torch.tensor(j, device=device), state)
    return beams.hypotheses()


def _strip_end(tokens: list[int], ends: Sequence[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in ends:
            return tokens[:i]
    return tokens


def generate_ids(
    model: GLM,
    contexts: list[list[int]],
    specials: SpecialTokens,
    strategy: Strategy = DEFAULT_STRATEGY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    banned: Sequence[int] | None = None,
    compile: bool = False,
    all_hypotheses: bool = False,
    min_new_tokens: int = 0,
    begin_suppress_tokens: Sequence[int] = (),
) -> list[list[int]] | list[list[list[int]]]:
    """The tokens of the first blank of each context (each a list of ids ending with <sop>, as
    glm130b.generate.inputs.generation_context builds it), without the end token. Tokens after
    <sop> are read as already generated (a causal prompt: `[gMASK, sop] + text`). With
    `all_hypotheses`, each context gets a list: beam search's finished hypotheses best first."""
    if not contexts:
        raise InputError("no prompts given")
    for c in contexts:
        if specials.sop not in c:
            raise InputError(
                "a context must end with <sop> (or hold it before tokens read as generated): build it "
                "with glm130b.generate.inputs.generation_context"
            )
    max_new_tokens = room_to_generate(model, contexts, max_new_tokens)
    if banned is None:
        banned = banned_tokens(specials, model.config.vocab_size)
    ends = end_tokens(specials)
    if isinstance(strategy, BeamSearch):
        if min_new_tokens or begin_suppress_tokens:
            raise InputError(
                "min_new_tokens and begin_suppress_tokens are for greedy and sampling; beam search ranks whole spans"
            )
        found = [
            [
                _strip_end(h, ends)
                for h in _beam_search_one(model, c, specials, strategy, max_new_tokens, banned, compile)
            ]
            for c in contexts
        ]
        return found if all_hypotheses else [h[0] for h in found]
    columns = [
        tokens
        for tokens, _ in iterate_tokens(
            model,
            contexts,
            specials,
            strategy,
            max_new_tokens,
            banned,
            compile,
            min_new_tokens=min_new_tokens,
            begin_suppress_tokens=begin_suppress_tokens,
        )
    ]
    generated = torch.stack(columns, dim=1).tolist()  # [B, steps]: the one sync at the end
    return [[_strip_end(row, ends)] if all_hypotheses else _strip_end(row, ends) for row in generated]


# ---------------------------------------------------------------------------------- blanks
def blank_kinds(contexts: list[list[int]], specials: SpecialTokens, two_d: bool = False) -> list[int | None]:
    """The mask token each context's blanks are (glm130b.generate.inputs.generation_mask), decided
    once from the prompt as the official code does: [MASK] before [sMASK] before [gMASK] (ChatGLM-6B,
    2-D: [gMASK] first). Masks of another kind are left in place, unfilled."""
    return [generation_mask(c, specials, two_d) for c in contexts]


def _rows_of(strategy: Strategy, rows: list[int], total: int) -> Strategy:
    """The strategy for a subset of the `total` prompts (per-prompt sampling options follow their rows)."""
    if not isinstance(strategy, Sampling):
        return strategy
    pick = {}
    for name in ("temperature", "top_k", "top_p"):
        values = getattr(strategy, name)
        if isinstance(values, (list, tuple)):
            if len(values) != total:
                raise InputError(
                    f"{name} has {len(values)} values for {total} prompts; give one value, or one per prompt"
                )
            pick[name] = [values[r] for r in rows]
    return replace(strategy, **pick) if pick else strategy


def fill_blanks(
    model: GLM,
    contexts: list[list[int]],
    specials: SpecialTokens,
    strategy: Strategy = DEFAULT_STRATEGY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    banned: Sequence[int] | None = None,
    compile: bool = False,
    min_new_tokens: int = 0,
    begin_suppress_tokens: Sequence[int] = (),
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Fill every blank of every context (ids without <sop>), left to right: the blanks are the masks
    of the kind `blank_kinds` picks; one generation pass per blank, the sequence rebuilt with the
    span in place of its mask before the next pass (the official rule). Contexts still holding a
    blank are batched together in each pass.
    Returns (filled sequences, the spans of each context in order)."""
    sequences = [list(c) for c in contexts]
    spans: list[list[list[int]]] = [[] for _ in contexts]
    kinds = blank_kinds(sequences, specials, model.config.position_encoding == "2d")
    # One pass per blank of the chosen kind (a span never holds a mask token: they are banned).
    passes = max((c.count(k) for c, k in zip(sequences, kinds) if k is not None), default=0)
    for _ in range(passes):
        rows = [i for i, s in enumerate(sequences) if kinds[i] is not None and kinds[i] in s]
        if not rows:
            break
        pending = [sequences[i] + [specials.sop] for i in rows]
        outputs = generate_ids(
            model,
            pending,
            specials,
            _rows_of(strategy, rows, len(contexts)),
            max_new_tokens,
            banned=banned,
            compile=compile,
            min_new_tokens=min_new_tokens,
            begin_suppress_tokens=begin_suppress_tokens,
        )
        for i, span in zip(rows, outputs):
            at = sequences[i].index(kinds[i])
            sequences[i] = sequences[i][:at] + span + sequences[i][at + 1 :]
            spans[i].append(span)
    return sequences, spans
