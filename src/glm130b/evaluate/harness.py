"""GLM as an lm-evaluation-harness model: `lm_eval ... --model glm130b --model_args model=DIR,quantized=int4`.

lm_eval's command finds models in its own table only; importing this module registers `glm130b`,
so run `python -m glm130b.evaluate.harness` with lm_eval's arguments (it registers, then hands over
to lm_eval's command line), or import it before `lm_eval.simple_evaluate` (docs/evaluation.md).

GLM-aware scoring: a continuation is read as a causal block after `context + [MASK]` (or
[gMASK]) with the context bidirectional and the official positions; requests that share a context
are packed into one sequence, as glm130b's multiple choice does. Rolling log-likelihood uses the
official lm windows; generation continues after `[gMASK]` with the generation engine.
"""

from __future__ import annotations

from collections import defaultdict

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from glm130b.core.errors import ConfigError
from glm130b.evaluate.language_model import windows
from glm130b.evaluate.loading import load_for_evaluation
from glm130b.evaluate.packing import pack_choices, score_batch
from glm130b.generate.decode import generate_ids
from glm130b.generate.strategies import Greedy

DEFAULT_STRIDE = 256  # rolling windows: the official lm stride
DEFAULT_MAX_GEN_TOKS = 256


@register_model("glm130b")
class GLMHarnessLM(TemplateLM):
    backend = "glm"  # not "causal": a continuation is encoded on its own, as GLM scores it

    def __init__(
        self,
        model: str | None = None,
        quantized: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        mask: str = "MASK",
        stride: int = DEFAULT_STRIDE,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,
        loaded: tuple | None = None,
    ):
        """`loaded`: an already loaded (model, tokenizer) pair instead of a model directory."""
        super().__init__()
        if mask not in ("MASK", "gMASK"):
            raise ConfigError(f"mask={mask!r}: use MASK (blank infilling, the official multiple choice) or gMASK")
        if loaded is None:
            if model is None:
                raise ConfigError("give --model_args model=DIR (a glm130b model directory)")
            loaded = load_for_evaluation(model, quantized, tokenizer, device, dtype)[:2]
        self.glm, self.glm_tokenizer = loaded
        self.specials = self.glm_tokenizer.specials
        self.gmask = mask == "gMASK"
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": a fixed default
        self.stride = int(stride)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.specials.eos

    @property
    def max_length(self) -> int:
        return self.glm.config.max_sequence_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.glm_tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.glm_tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation encoded each on its own (the official rule); trailing spaces
        of the context move to the continuation, as lm_eval does."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self.tok_encode(context), self.tok_encode(continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        by_context: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, context, _) in enumerate(requests):
            empty = list(context) == [self.prefix_token_id]  # lm_eval's stand-in for an empty context
            by_context[() if empty else tuple(context)].append(i)
        groups = list(by_context.items())
        sequences = []
        for context, members in groups:
            continuations = [list(requests[i][2]) for i in members]
            keep = self.max_length - sum(len(c) for c in continuations) - 2
            if keep < 0:
                raise ConfigError(
                    f"continuations of {sum(map(len, continuations))} tokens do not fit the model's "
                    f"{self.max_length}-token context"
                )
            sequences.append(
                pack_choices(
                    list(context)[-keep:] if keep else [],
                    continuations,
                    self.specials,
                    gmask=self.gmask,
                    single_token=False,
                )
            )
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        order = sorted(range(len(sequences)), key=lambda g: -len(sequences[g].tokens))
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="glm130b loglikelihood"):
            chunk = order[start : start + self.batch_size]
            for g, spans in zip(chunk, score_batch(self.glm, [sequences[g] for g in chunk], self.specials.pad)):
                for i, span in zip(groups[g][1], spans):
                    out[i] = (span.log_prob, span.greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over the official lm windows ([gMASK], stride `stride`)."""
        totals = []
        for request in tqdm(requests, disable=disable_tqdm, desc="glm130b rolling loglikelihood"):
            seqs = windows(self.tok_encode(request.args[0]), self.max_length, self.stride, self.specials)
            total = 0.0
            for start in range(0, len(seqs), self.batch_size):
                total += sum(
                    span.log_prob
                    for [span] in score_batch(self.glm, seqs[start : start + self.batch_size], self.specials.pad)
                )
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation after `context + [gMASK]`, cut at the first `until` string (sampling
        options in the request are not used)."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="glm130b generate_until"):
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(options.get("max_gen_toks", self.max_gen_toks))
            keep = self.max_length - new_tokens - 2  # room for [gMASK], <sop> and the new tokens
            if keep < 1:
                raise ConfigError(
                    f"max_gen_toks {new_tokens} leaves no room for a context in the model's "
                    f"{self.max_length} tokens; lower it"
                )
            ids = self.tok_encode(context)[-keep:]
            [span] = generate_ids(
                self.glm, [ids + [self.specials.gmask, self.specials.sop]], self.specials, Greedy(), new_tokens
            )
            text = self.tok_decode(span)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results


def main() -> None:
    """`python -m glm130b.evaluate.harness ARGS`: lm_eval's command line with `glm130b` registered."""
    from lm_eval.__main__ import cli_evaluate  # deferred: lm_eval's command line, only for this entry point

    cli_evaluate()


if __name__ == "__main__":
    main()
