"""The real server (uvicorn on 127.0.0.1) through the official `openai` client and raw HTTP: answers
against glm130b.generate, concurrency, streaming, infilling, errors, limits, cancellation, metrics."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from openai import OpenAI

from glm130b.generate.api import generate
from glm130b.generate.decode import fill_blanks
from glm130b.generate.inputs import build_generation_batch
from glm130b.generate.prompts import parse_prompt
from glm130b.generate.strategies import BeamSearch, Greedy, Sampling
from tests.serve.conftest import MODEL_NAME, start_server

TIMEOUT_S = 60  # per HTTP call; every call here takes well under a second on an idle core
PROMPTS = ["abc", "bc[MASK]f", "a[MASK]d[MASK]h", "hgf", "ab[MASK]e", "deg", "cd[MASK]h", "fed"]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c:
        yield c


EXTENSIONS = ("ignore_eos", "num_beams", "length_penalty", "no_repeat_ngram_size", "top_k")


def complete(client, **fields):
    """client.completions.create with greedy, 8-token defaults; GLM's extensions go in extra_body."""
    extra = {k: fields.pop(k) for k in EXTENSIONS if k in fields}
    return client.completions.create(
        model=MODEL_NAME, **{"max_tokens": 8, "temperature": 0, **fields}, extra_body=extra or None
    )


def by_index(response):
    return sorted(response.choices, key=lambda c: c.index)


def stream_texts(client, **fields):
    """Per choice index: the concatenated streamed text and the closing chunk's choice."""
    texts, last = {}, {}
    for chunk in complete(client, stream=True, **fields):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                last[choice.index] = choice
    return texts, last


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------------------------- answers
def test_openai_client_gets_the_answers_of_generate(client, reference):
    model, tokenizer = reference
    response = complete(client, prompt=PROMPTS)
    expected = generate(model, tokenizer, PROMPTS, Greedy(), 8)
    assert [c.index for c in by_index(response)] == list(range(len(PROMPTS)))
    for choice, want in zip(by_index(response), expected):
        assert choice.blanks == want.blanks
        assert choice.text == "".join(want.blanks)
        assert choice.filled_text == want.text
        assert choice.finish_reason == "stop"
    contexts = [parse_prompt(p, tokenizer).context for p in PROMPTS]
    generated = sum(
        len(w.token_ids) - len(c) + sum(t in tokenizer.specials.mask_ids for t in c) for w, c in zip(expected, contexts)
    )  # each mask token became its span
    assert response.usage.prompt_tokens == sum(len(c) + 1 for c in contexts)
    assert response.usage.completion_tokens == generated
    assert response.model == MODEL_NAME and response.object == "text_completion"


def test_concurrent_greedy_requests_equal_the_same_requests_one_by_one(client, server, reference):
    """8 requests at once (several sharing the 4 rows, joining and leaving the batch between
    steps) get what each gets alone; the engine really held several at a time."""
    requests = [dict(prompt=p, max_tokens=4 + i) for i, p in enumerate(PROMPTS)]
    requests += [
        dict(prompt="abcdefgh", max_tokens=30, ignore_eos=True),
        dict(prompt="hg", max_tokens=12, ignore_eos=True),
    ]
    one_by_one = [complete(client, **r).choices[0].text for r in requests]
    busiest, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            busiest[0] = max(busiest[0], server.engine.running)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: complete(client, **r).choices[0].text, requests))
    finally:
        done.set()
        watcher.join()
    assert together == one_by_one
    assert busiest[0] > 1
    model, tokenizer = reference
    for r, text in zip(requests[: len(PROMPTS)], together):
        assert text == "".join(generate(model, tokenizer, r["prompt"], Greedy(), r["max_tokens"])[0].blanks)


@pytest.mark.parametrize(
    "fields",
    [
        dict(prompt="abc"),
        dict(prompt="a[MASK]d[MASK]h"),
        dict(prompt=PROMPTS[:4]),
        dict(prompt="abcdefgh", max_tokens=20, ignore_eos=True, stop=["ab", "gh"]),
        dict(prompt="cd[MASK]h", echo=True, logprobs=2),
        dict(prompt="abc", n=3, temperature=1.4, seed=7, max_tokens=12),
    ],
    ids=["gmask", "two-blanks", "four-prompts", "stop-strings", "echo-logprobs", "n3-seeded"],
)
def test_streaming_equals_non_streaming(client, fields):
    whole = complete(client, **fields)
    texts, last = stream_texts(client, **fields)
    assert sorted(texts) == [c.index for c in by_index(whole)]
    for choice in by_index(whole):
        assert texts[choice.index] == choice.text
        closing = last[choice.index]
        assert (closing.finish_reason, closing.blanks, closing.filled_text) == (
            choice.finish_reason,
            choice.blanks,
            choice.filled_text,
        )
        if choice.logprobs is not None:
            assert closing.logprobs.token_logprobs == choice.logprobs.token_logprobs


def test_stream_reports_usage_when_asked(client):
    chunks = list(complete(client, prompt="abc", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 5  # a b c [gMASK] <sop>
    assert chunks[-1].usage.completion_tokens == len(complete(client, prompt="abc").choices[0].text)


# ---------------------------------------------------------------------------------- GLM specifics
def test_mask_infilling_returns_the_spans_of_generate_fill(client, reference):
    model, tokenizer = reference
    prompts = ["bc[MASK]f", "a[MASK]d[MASK]h", "b[MASK]e", "[MASK]cde"]
    contexts = [parse_prompt(p, tokenizer).context for p in prompts]
    _, spans = fill_blanks(
        model,
        contexts,
        tokenizer.specials,
        Greedy(),
        8,
        banned=sorted(set(tokenizer.specials.mask_ids) | {tokenizer.specials.sop, tokenizer.specials.pad}),
    )
    response = complete(client, prompt=prompts)
    for choice, prompt_spans, prompt in zip(by_index(response), spans, prompts):
        blanks = [tokenizer.decode(s) for s in prompt_spans]
        assert choice.blanks == blanks
        filled = prompt
        for blank in blanks:
            filled = filled.replace("[MASK]", blank, 1)
        assert choice.filled_text == filled
    # suffix is OpenAI's insertion: prompt + [MASK] + suffix
    assert complete(client, prompt="bc", suffix="f").choices[0].blanks == by_index(response)[0].blanks


def test_beam_search_extension_equals_generate(client, reference):
    model, tokenizer = reference
    response = complete(client, prompt="a[MASK]d[MASK]h", num_beams=3, length_penalty=0.5)
    expected = generate(model, tokenizer, "a[MASK]d[MASK]h", BeamSearch(num_beams=3, length_penalty=0.5), 8)[0]
    assert response.choices[0].blanks == expected.blanks


def test_seeded_choices_equal_generate_with_seed_plus_index(client, reference):
    model, tokenizer = reference
    response = complete(client, prompt="abc", n=2, temperature=1.3, top_p=0.9, seed=5, max_tokens=10)
    for i, choice in enumerate(by_index(response)):
        want = generate(model, tokenizer, "abc", Sampling(temperature=1.3, top_p=0.9, seed=5 + i), 10)[0]
        assert choice.text == "".join(want.blanks)


def test_logprobs_equal_a_full_forward(client, reference):
    """The first token's log-prob and its top alternatives, against log_softmax of a full forward
    at <sop> with the never-generated tokens removed."""
    model, tokenizer = reference
    choice = complete(client, prompt="abc", logprobs=3, echo=True).choices[0]
    specials = tokenizer.specials
    context = parse_prompt("abc", tokenizer).context + [specials.sop]
    batch = build_generation_batch([context], specials)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask)[0, -1]
    logits[sorted(set(specials.mask_ids) | {specials.sop, specials.pad})] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    values, ids = torch.topk(logp, 3)
    lp = choice.logprobs
    assert lp.tokens[0] == tokenizer.decode([int(ids[0])])
    assert lp.token_logprobs[0] == pytest.approx(float(values[0]), abs=1e-4)
    assert list(lp.top_logprobs[0]) == [tokenizer.decode([i]) for i in ids.tolist()]
    assert choice.text == "abc" + "".join(lp.tokens) and lp.text_offset[0] == 3  # echo: offsets after the prompt


# ---------------------------------------------------------------------------------- errors and limits
BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "m", "prompt": ', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "Input should be a valid dictionary"),
    ("empty body", b"", 400, "the body is empty"),
    ("wrong type", {"prompt": "abc", "max_tokens": "many"}, 400, "max_tokens: Input should be a valid integer"),
    ("string as number", {"prompt": "abc", "temperature": "0.5"}, 400, "temperature"),
    ("unknown field", {"prompt": "abc", "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
    ("no prompt", {}, 400, "prompt: Field required"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("n out of range", {"prompt": "abc", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ("over-length prompt", {"prompt": "a" * 600}, 400, "more than this server's limit of 512 tokens"),
    ("too many tokens", {"prompt": "abc", "max_tokens": 600}, 400, "lower max_tokens"),
    ("unknown marker", {"prompt": "ab[XMASK]c"}, 400, "unknown mask marker [XMASK]"),
    ("unsupported option", {"prompt": "abc", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ("beams with n", {"prompt": "abc", "num_beams": 2, "n": 2}, 400, "cannot be combined with beam search"),
    ("too many stops", {"prompt": "abc", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("unknown model", {"model": "gpt-4", "prompt": "abc"}, 404, "this server serves 'glm-tiny-reverser'"),
    ("oversize body", {"prompt": "a" * 5000}, 413, "larger than this server's limit of 4096 bytes"),
]


@pytest.mark.parametrize("body, status, message", [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_message_and_the_server_stays_up(http, body, status, message):
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL_NAME, **body}).encode()
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"]
    assert http.get("/health").json()["status"] == "ok"
    assert (
        http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abc", "temperature": 0}).status_code == 200
    )


def test_an_oversize_chunked_body_is_refused_before_it_is_read_whole(http):
    """No Content-Length: the limit applies as the chunks arrive."""

    def chunks():
        yield b'{"model": "%s", "prompt": "' % MODEL_NAME.encode()
        for _ in range(100):
            yield b"a" * 100
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]


def test_a_client_that_goes_away_frees_its_row(http, server):
    """A 400-token stream closed after its first event is cancelled: its row frees at once and
    far fewer than 400 tokens are generated."""
    tokens_before, cancelled_before = (
        metric(http, "glm130b_generated_tokens_total"),
        metric(http, 'glm130b_requests_total{status="cancelled"}'),
    )
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert next(line for line in r.iter_lines() if line).startswith("data: ")
    deadline = time.monotonic() + 10
    while server.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.running == 0
    assert metric(http, 'glm130b_requests_total{status="cancelled"}') == cancelled_before + 1
    assert metric(http, "glm130b_generated_tokens_total") - tokens_before < 400


def test_a_full_queue_answers_429(model_dir):
    """One row and one queue place: while a long request runs, of three more sent at once one
    waits and two are refused with 429; the accepted ones finish."""
    server = start_server(model_dir, max_batch=1, max_queue=1)
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 450, "ignore_eos": True}
    try:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http, ThreadPoolExecutor(4) as pool:
            first = pool.submit(http.post, "/v1/completions", json=body)
            deadline = time.monotonic() + 10
            while not server.engine.running and time.monotonic() < deadline:
                time.sleep(0.001)
            replies = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(3)))
            replies.append(first.result())
    finally:
        server.stop()
    assert sorted(r.status_code for r in replies) == [200, 200, 429, 429]
    for r in replies:
        if r.status_code == 429:
            assert "sequences are waiting (the limit is 1); retry later" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 450


def test_a_request_over_the_timeout_gets_504_and_frees_its_row(model_dir):
    server = start_server(model_dir, request_timeout=0.1)  # 500 tokens take ~0.6 s on one core
    try:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http:
            body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 500, "ignore_eos": True}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 504 and "did not finish within 0.1 s" in r.json()["error"]["message"]
            deadline = time.monotonic() + 10
            while server.engine.running and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.engine.running == 0
            assert http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abc"}).status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- other routes
def test_models_health_metrics_playground_and_schema(http, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 512
    assert http.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0, "max_batch": 4}
    before = metric(http, "glm130b_generated_tokens_total")
    usage = complete(client, prompt=PROMPTS[:3]).usage
    assert metric(http, "glm130b_generated_tokens_total") - before == usage.completion_tokens
    text = http.get("/metrics").text
    for family in (
        "glm130b_queue_length",
        "glm130b_batch_occupancy",
        "glm130b_tokens_per_second",
        "glm130b_request_latency_seconds_bucket",
        "glm130b_time_to_first_token_seconds_bucket",
        "glm130b_step_seconds_bucket",
    ):
        assert family in text
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<textarea id="prompt"' in page.text and "[gMASK]" in page.text
    schema = http.get("/openapi.json").json()
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == [MODEL_NAME]
    assert {"num_beams", "length_penalty", "no_repeat_ngram_size", "top_k", "ignore_eos"} <= set(request)
