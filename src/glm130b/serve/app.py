"""The HTTP server: FastAPI routes over one Engine (OpenAI's legacy completions API + GLM extensions).

Routes: POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus), GET / (the
playground page). Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}},
with a 4xx status for a bad request; a request's events come from the engine thread through an
asyncio queue, and a client that goes away cancels its sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
import warnings
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glm130b.core.errors import InputError
from glm130b.generate.prompts import parse_prompt
from glm130b.generate.strategies import BeamSearch
from glm130b.serve import limits
from glm130b.serve.engine import (
    DecodeOptions,
    Engine,
    EngineClosed,
    Job,
    JobFailed,
    QueueFull,
    SequenceDone,
    SequenceResult,
    SequenceSpec,
    TextDelta,
)
from glm130b.serve.metrics import ServeMetrics
from glm130b.serve.schema import (
    Choice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    Logprobs,
    ModelCard,
    ModelList,
    StreamChoice,
    Usage,
)

ERROR_STATUSES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_STATUSES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def _validation_message(errors) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first field named."""
    lines, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        if e.get("type") == "json_invalid":  # its loc is a character position, not a field
            lines.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', '')}); send one JSON object")
            continue
        param = param or (loc[0] if loc else None)
        if e.get("type") == "extra_forbidden":
            lines.append(f"unknown field {field!r}: it is not an option of this endpoint (see GET /openapi.json)")
        elif e.get("type") == "missing" and not loc:
            lines.append("the body is empty: send a JSON object with at least model and prompt")
        else:
            lines.append(f"{field}: {e.get('msg')}" if field else str(e.get("msg")))
    return "; ".join(lines) or "invalid request", param


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413) before any route reads them, whether the size
    is announced in Content-Length or the body arrives chunked."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = (
            f"the request body is larger than this server's limit of {self.max_bytes} bytes; send a "
            "smaller request (or start the server with a larger --max-body-bytes)"
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(
                    send, 400, f"Content-Length {declared.decode(errors='replace')!r} is not a number of bytes"
                )
            if int(declared) > self.max_bytes:
                return await self._refuse(send, 413, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(send, 413, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real channel: it reports a client that disconnects

        await self.app(scope, replay, send)


class _Events:
    """Engine events for one request, handed from the engine thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event) -> None:  # engine thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _check_supported(body: CompletionRequest) -> None:
    if body.presence_penalty or body.frequency_penalty:
        name = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise APIError(400, f"{name} is not supported by this server; leave it at 0", name)
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "best_of is not supported by this server; leave it out (or equal to n)", "best_of")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server; leave it out", "logit_bias")
    if body.num_beams > 1:
        for name, bad in (("n", body.n > 1), ("logprobs", body.logprobs is not None), ("ignore_eos", body.ignore_eos)):
            if bad:
                raise APIError(
                    400,
                    f"{name} cannot be combined with beam search (num_beams > 1): beam search "
                    "returns its single best hypothesis",
                    name,
                )


def _prompts(body: CompletionRequest, tokenizer) -> list:
    texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if body.suffix is not None:
        texts = [t + "[MASK]" + body.suffix for t in texts]
    parsed = []
    for i, text in enumerate(texts):
        try:
            with warnings.catch_warnings():  # [sMASK]'s warning is for a terminal, not a log per request
                warnings.simplefilter("ignore")
                parsed.append(parse_prompt(text, tokenizer))
        except InputError as err:
            where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            raise APIError(400, f"{where}: {err}", "prompt") from None
    if body.suffix is not None and any(len(p.markers) != 1 for p in parsed):
        raise APIError(
            400,
            "suffix is given, so the prompt must hold no mask marker of its own ([MASK] goes "
            "between prompt and suffix); remove the markers or the suffix",
            "suffix",
        )
    return parsed


def _options(body: CompletionRequest, choice: int) -> DecodeOptions:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    beam = None
    if body.num_beams > 1:
        beam = BeamSearch(
            num_beams=body.num_beams, length_penalty=body.length_penalty, no_repeat_ngram_size=body.no_repeat_ngram_size
        )
    return DecodeOptions(
        max_tokens=body.max_tokens,
        temperature=body.temperature if beam is None else 0.0,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=None if body.seed is None else body.seed + choice,
        stop=stop,
        logprobs=body.logprobs,
        beam=beam,
        ignore_eos=body.ignore_eos,
    )


def _logprobs(result: SequenceResult, offset: int) -> Logprobs | None:
    if result.logprobs is None:
        return None
    offsets = []
    for entry in result.logprobs:
        offsets.append(offset)
        offset += len(entry.token)
    top = [e.top for e in result.logprobs] if any(e.top is not None for e in result.logprobs) else None
    return Logprobs(
        tokens=[e.token for e in result.logprobs],
        token_logprobs=[e.logprob for e in result.logprobs],
        top_logprobs=top,
        text_offset=offsets,
    )


def create_app(
    engine: Engine,
    model_name: str,
    *,
    request_timeout: float = limits.REQUEST_TIMEOUT_S,
    max_body_bytes: int = limits.MAX_BODY_BYTES,
    drain_timeout: float = limits.DRAIN_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app over `engine` (started with the app, drained and stopped when it shuts down)."""
    metrics = ServeMetrics(engine)
    engine.on_step = metrics.on_step
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain_timeout)

    app = FastAPI(
        title="glm130b",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions with GLM's blank infilling ([MASK]) and beam search.",
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, param = _validation_message(err.errors())
        metrics.requests.labels("rejected").inc()
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        metrics.requests.labels("rejected" if err.status < 500 else "error").inc()
        return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status)

    errors = {status: {"model": ErrorResponse} for status in (400, 404, 413, 429, 503, 504)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return resources.files("glm130b.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/health", response_model=Health)
    async def health():
        return Health(
            status="draining" if engine.closing else "ok",
            running=engine.running,
            waiting=engine.queue_length,
            max_batch=engine.max_batch,
        )

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=created, max_model_len=engine.max_total_tokens)])

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            **errors,
            200: {
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": "a CompletionResponse, or with stream=true server-sent CompletionChunk "
                "events ending with `data: [DONE]`",
            },
        },
    )
    async def completions(body: CompletionRequest, request: Request):
        started = time.monotonic()
        if body.model != model_name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                "model",
                "model_not_found",
            )
        _check_supported(body)
        prompts = _prompts(body, engine.tokenizer)
        specs = [
            SequenceSpec(p, _options(body, i), k * body.n + i) for k, p in enumerate(prompts) for i in range(body.n)
        ]
        events = _Events(asyncio.get_running_loop())
        try:
            job = engine.submit(specs, events.put, stream=body.stream)
        except InputError as err:
            raise APIError(400, str(err), "max_tokens" if "max_tokens" in str(err) else "prompt") from None
        except QueueFull as err:
            raise APIError(429, str(err), code="queue_full") from None
        except EngineClosed as err:
            raise APIError(503, str(err), code="shutting_down") from None
        prompt_texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        echoes = [prompt_texts[s.index // body.n] if body.echo else "" for s in specs]
        usage_in = sum(len(p.context) + 1 for p in prompts)  # with <sop>: what the model reads
        request_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        deadline = started + request_timeout
        served = _Served(engine, job, metrics, started)
        if body.stream:
            return StreamingResponse(
                _stream(served, events, body, specs, echoes, usage_in, request_id, now, model_name, deadline),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        results: dict[int, SequenceResult] = {}
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while len(results) < len(specs):
                getter = asyncio.ensure_future(events.queue.get())
                ready, _ = await asyncio.wait(
                    {getter, gone}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in ready:
                    getter.cancel()
                    if gone in ready:
                        served.end("cancelled")
                        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
                    served.end("timeout")
                    raise APIError(
                        504,
                        f"the request did not finish within {request_timeout:g} s (the server's "
                        "--request-timeout); ask for fewer tokens or retry later",
                    )
                event = getter.result()
                served.first_event()
                if isinstance(event, JobFailed):
                    served.end("error")
                    raise APIError(500, event.message)
                if isinstance(event, SequenceDone):
                    results[event.index] = event.result
            served.end("ok")
        finally:
            gone.cancel()
            served.end("cancelled")  # left early (an error, or the server's task cancelled): free the rows
        choices = [
            Choice(
                index=s.index,
                text=echo + "".join(results[s.index].blanks),
                logprobs=_logprobs(results[s.index], len(echo)),
                finish_reason=results[s.index].finish_reason,
                blanks=results[s.index].blanks,
                filled_text=results[s.index].filled_text,
            )
            for s, echo in zip(specs, echoes)
        ]
        usage_out = sum(r.completion_tokens for r in results.values())
        return CompletionResponse(
            id=request_id,
            created=now,
            model=model_name,
            choices=choices,
            usage=Usage(prompt_tokens=usage_in, completion_tokens=usage_out, total_tokens=usage_in + usage_out),
        )

    original_openapi = app.openapi

    def openapi():
        """The served model's id as the only `model` value, and 400 (not FastAPI's 422) for a bad body."""
        if app.openapi_schema is None:
            schema = original_openapi()
            schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] = [model_name]
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the ASGI channel reports http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Served:
    """A request's bookkeeping: cancels its job unless it finished, records its latency once."""

    def __init__(self, engine: Engine, job: Job, metrics: ServeMetrics, started: float):
        self.engine, self.job, self.metrics, self.started = engine, job, metrics, started
        self.ended = False
        self.first = False

    def first_event(self) -> None:
        if not self.first:
            self.first = True
            self.metrics.first_token.observe(time.monotonic() - self.started)

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = True
        if status != "ok":
            self.engine.cancel(self.job)
        self.metrics.requests.labels(status).inc()
        self.metrics.latency.observe(time.monotonic() - self.started)


def _sse(payload) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


async def _stream(
    served: _Served,
    events: _Events,
    body: CompletionRequest,
    specs,
    echoes,
    usage_in: int,
    request_id: str,
    created: int,
    model_name: str,
    deadline: float,
):
    """Server-sent events: the echoed prompts, each text delta with its blank, one closing chunk per
    choice (finish_reason, blanks, filled_text, logprobs), the usage if asked, then [DONE]."""

    def chunk(choices, usage=None) -> str:
        return _sse(CompletionChunk(id=request_id, created=created, model=model_name, choices=choices, usage=usage))

    done, usage_out = 0, 0
    try:
        for spec, echo in zip(specs, echoes):
            if echo:
                yield chunk([StreamChoice(index=spec.index, text=echo)])
        while done < len(specs):
            try:
                event = await asyncio.wait_for(events.queue.get(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                served.end("timeout")
                yield _sse(
                    json.dumps(
                        error_body(
                            504,
                            "the request did not finish within the server's "
                            "--request-timeout; ask for fewer tokens or retry later",
                        )
                    )
                )
                return
            served.first_event()
            if isinstance(event, JobFailed):
                served.end("error")
                yield _sse(json.dumps(error_body(500, event.message)))
                return
            if isinstance(event, TextDelta):
                yield chunk([StreamChoice(index=event.index, text=event.text, blank_index=event.blank)])
            elif isinstance(event, SequenceDone):
                done += 1
                r = event.result
                usage_out += r.completion_tokens
                echo = echoes[[s.index for s in specs].index(event.index)]
                yield chunk(
                    [
                        StreamChoice(
                            index=event.index,
                            text="",
                            finish_reason=r.finish_reason,
                            blanks=r.blanks,
                            filled_text=r.filled_text,
                            logprobs=_logprobs(r, len(echo)),
                        )
                    ]
                )
        served.end("ok")
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk(
                [], Usage(prompt_tokens=usage_in, completion_tokens=usage_out, total_tokens=usage_in + usage_out)
            )
        yield _sse("[DONE]")
    finally:
        served.end("cancelled")  # the client went away mid-stream: free the rows
