"""Request and response bodies of the OpenAI-compatible API (pydantic), with GLM's extensions.

Requests are strict (a string where a number belongs is refused, not converted) and closed
(an unknown field is an error, so a misspelt option never passes silently). Extensions to
OpenAI's legacy completions API are marked "GLM extension" in their descriptions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's own bounds, kept so a client written for it sees the same limits.
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5
MAX_N = 16  # more choices than this per prompt is almost surely a mistake; it multiplies the work


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the served model's id (GET /v1/models)")
    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="text, or a list of texts; [MASK] marks a blank to fill, [gMASK] a text to continue "
        "(appended when the prompt has no marker)",
        examples=["Paris is the [MASK] of France."],
    )
    suffix: str | None = Field(
        None,
        description="text after the completion: the prompt becomes prompt + [MASK] + suffix, and the blank is filled",
    )
    max_tokens: int = Field(16, ge=1, description="most tokens generated for each blank")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="GLM extension: keep the k most likely tokens (0: all)")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"up to {MAX_STOP_STRINGS} strings that end a blank"
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="reproducible sampling: choice i draws with seed + i"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log-probs of the generated tokens and of this many alternatives"
    )
    echo: bool = Field(False, description="put the prompt before the completion in `text`")
    stream: bool = Field(False, description="send the completion as server-sent events")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    # Accepted so that OpenAI clients may send their defaults; any other value is refused (400).
    presence_penalty: float = Field(0.0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, description="not supported: only 0")
    best_of: int | None = Field(None, description="not supported: only 1 (or n)")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only empty")
    num_beams: int = Field(
        1,
        ge=1,
        le=MAX_N,
        description="GLM extension: beam search with this many beams (> 1; runs alone, not continuously batched)",
    )
    length_penalty: float = Field(
        1.0, ge=-10.0, le=10.0, description="GLM extension (beam search): score / ((5 + length) / 6) ** penalty"
    )
    no_repeat_ngram_size: int = Field(0, ge=0, le=64, description="GLM extension (beam search): no repeated n-gram")
    ignore_eos: bool = Field(
        False, description="GLM extension: ban the end tokens, so every blank runs to max_tokens (for benchmarks)"
    )


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    blanks: list[str] | None = Field(None, description="GLM extension: the text generated for each blank")
    filled_text: str | None = Field(None, description="GLM extension: the prompt with its blanks filled")


class StreamChoice(Choice):
    blank_index: int | None = Field(
        None, description="GLM extension: the blank this text belongs to (none for echoed prompt text)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm130b"
    max_model_len: int = Field(description="GLM extension: most prompt + generated tokens per sequence")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "draining"]
    running: int
    waiting: int
    max_batch: int
