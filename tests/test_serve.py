"""`logo serve` end to end: a real uvicorn process with a tiny random model, driven by the `openai` client and
raw HTTP. Outputs are checked against the engine run in this process (`engine.generate`, `engine.route`)."""

from __future__ import annotations

import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from logo.router import RouterConfig, Selection
from logo.serve.sampling import Penalties
from logo.spec import EngineSpec
from tests.helpers import MIXED_SPECS, make_library, make_tiny_model, save_tiny_model
from tests.serve_helpers import TINY_CHAT_TEMPLATE, ServerProcess, penalized_greedy

openai = pytest.importorskip("openai")

K = 2
PROMPT_LIMIT = 64
TOKENS_LIMIT = 400
KEY = "sekret-key"
MAX_QUEUE = 64
PROMPTS = [f"{word} number {i}:" for i, word in enumerate(["apple", "river", "stone", "cloud"] * 8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    make_library(make_tiny_model(), root / "lib", MIXED_SPECS)
    common = ["--base-model", str(model_dir), "--adapters", str(root / "lib"), "-k", str(K), "--device", "cpu",
              "--max-prompt-tokens", str(PROMPT_LIMIT), "--max-tokens-limit", str(TOKENS_LIMIT), "--threads", "1"]
    main = ServerProcess([*common, "--max-batch-size", "32", "--max-queue", str(MAX_QUEUE)], root / "main.log")
    small = ServerProcess([*common, "--max-batch-size", "1", "--max-queue", "1", "--api-key", KEY], root / "small.log")
    engine = EngineSpec(str(model_dir), str(root / "lib"), RouterConfig(k=K), device="cpu").build()
    try:
        yield {"main": main.wait(), "small": small.wait(), "engine": engine, "base": str(model_dir)}
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup["main"].url + "/v1", api_key="unused", max_retries=0)


def post(server, path: str, body, **kwargs) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, content=data, headers=headers, timeout=60, **kwargs)


def greedy(engine, prompt: str, tokens: int, selection=None) -> str:
    selections = None if selection is None else [selection]
    return engine.generate([prompt], max_new_tokens=tokens, batch_size=1, selections=selections)[0].text


# --------------------------------------------------------------- openai client
def test_completion_routes_and_matches_engine(setup, client):
    engine = setup["engine"]
    response = client.completions.create(model="logo", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert response.choices[0].text == greedy(engine, PROMPTS[0], 12)
    assert response.usage.prompt_tokens == len(engine.tokenizer(PROMPTS[0])["input_ids"])
    assert response.usage.completion_tokens <= 12
    route = engine.route([PROMPTS[0]])[0]
    logo = response.model_extra["logo"]
    assert [s["name"] for s in logo["selected"]] == route.names
    assert [s["weight"] for s in logo["selected"]] == pytest.approx(route.weights, rel=1e-5)
    assert logo["abstained"] is False


def test_streamed_completion_equals_plain(client):
    plain = client.completions.create(model="logo", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="logo", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].model_extra["logo"]["selected"] == plain.model_extra["logo"]["selected"]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_plain_and_streamed(setup, client):
    engine = setup["engine"]
    messages = [{"role": "user", "content": "hello there"}]
    response = client.chat.completions.create(model="logo", messages=messages, max_tokens=8, temperature=0)
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert response.choices[0].message.content == greedy(engine, prompt, 8)
    chunks = list(client.chat.completions.create(model="logo", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["logo"]["selected"] == response.model_extra["logo"]["selected"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == response.choices[0].message.content
    assert chunks[-1].usage.total_tokens == response.usage.total_tokens


def test_openai_fields_clients_send(setup, client):
    """Penalties reach the rows (the formula written out); the neutral values of fields this server does not act
    on (logprobs false, top_logprobs 0) and an assistant message with null content are accepted."""
    engine = setup["engine"]
    prompt = "a b a b a b"
    penalties = Penalties(presence=0.5, frequency=2.0)
    response = client.completions.create(model=setup["base"], prompt=prompt, max_tokens=10, temperature=0,
                                         presence_penalty=0.5, frequency_penalty=2.0)
    with torch.no_grad():
        expected = penalized_greedy(engine, prompt, 10, penalties)
        plain = penalized_greedy(engine, prompt, 10, Penalties())
    assert expected != plain
    assert response.choices[0].text == engine.tokenizer.decode(expected, skip_special_tokens=True)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "again"}]
    chat = client.chat.completions.create(model="logo", messages=history, max_tokens=6, temperature=0,
                                          logprobs=False, top_logprobs=0, presence_penalty=0, frequency_penalty=0)
    filled = [{**m, "content": m["content"] or ""} for m in history]
    prompt = engine.tokenizer.apply_chat_template(filled, tokenize=False, add_generation_prompt=True)
    assert chat.choices[0].message.content == greedy(engine, prompt, 6)
    nulls = client.completions.create(model="logo", prompt=PROMPTS[0], max_tokens=12, temperature=0, top_p=None,
                                      n=None, stream=None, presence_penalty=None, frequency_penalty=None)
    assert nulls.choices[0].text == greedy(engine, PROMPTS[0], 12)  # null is the default, as OpenAI
    negative = [client.completions.create(model="logo", prompt=PROMPTS[0], max_tokens=6, seed=-1).choices[0].text
                for _ in range(2)]
    assert negative[0] == negative[1]
    assert client.models.retrieve(setup["base"]).id == setup["base"]
    with pytest.raises(openai.NotFoundError, match="GET /v1/models lists them"):
        client.models.retrieve("gpt-17")


def test_usage_chunk_only_when_asked(client):
    """As OpenAI: the final chunk of no choices, with the usage, comes only with stream_options.include_usage."""
    plain = list(client.completions.create(model="logo", prompt=PROMPTS[1], max_tokens=4, stream=True))
    assert all(c.choices and c.usage is None for c in plain)
    messages = [{"role": "user", "content": "hello"}]
    chat = list(client.chat.completions.create(model="logo", messages=messages, max_tokens=4, stream=True))
    assert all(c.choices and c.usage is None for c in chat)
    asked = list(client.chat.completions.create(model="logo", messages=messages, max_tokens=4, stream=True,
                                                stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens >= 1


def test_tiny_temperature_is_greedy(setup, client):
    """A temperature too small to divide logits by (1e-40 overflows float32) is greedy, as 0 is."""
    response = client.completions.create(model="logo", prompt=PROMPTS[0], max_tokens=12, temperature=1e-40)
    assert response.choices[0].text == greedy(setup["engine"], PROMPTS[0], 12)


def test_base_and_single_adapter_models(setup, client):
    engine = setup["engine"]
    base = client.completions.create(model=setup["base"], prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert base.model_extra["logo"]["selected"] == []
    assert base.choices[0].text == greedy(engine, PROMPTS[2], 8, Selection([], []))
    name = MIXED_SPECS[1]["name"]
    one = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert one.model_extra["logo"]["selected"] == [{"name": name, "weight": 1.0, "score": None}]
    assert one.choices[0].text == greedy(engine, PROMPTS[2], 8, Selection([1], [1.0]))


def test_extension_object(setup, client):
    engine = setup["engine"]
    mix = {MIXED_SPECS[0]["name"]: 0.7, MIXED_SPECS[4]["name"]: 0.3}
    response = client.completions.create(model="logo", prompt=PROMPTS[3], max_tokens=8, temperature=0,
                                         extra_body={"logo": {"adapters": mix}})
    assert {s["name"]: s["weight"] for s in response.model_extra["logo"]["selected"]} == mix
    assert response.choices[0].text == greedy(engine, PROMPTS[3], 8, Selection([0, 4], [0.7, 0.3]))
    one = client.completions.create(prompt=PROMPTS[3], model="logo", max_tokens=2, extra_body={"logo": {"k": 1}})
    assert len(one.model_extra["logo"]["selected"]) == 1
    assert one.model_extra["logo"]["selected"][0]["weight"] == pytest.approx(1.0)
    base = client.completions.create(prompt=PROMPTS[3], model="logo", max_tokens=2, extra_body={"logo": {"base": True}})
    assert base.model_extra["logo"]["selected"] == []


def test_prompt_list_and_stop(setup, client):
    engine = setup["engine"]
    response = client.completions.create(model="logo", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [
        greedy(engine, p, 6) for p in PROMPTS[:3]]
    full = greedy(engine, PROMPTS[5], 20)
    stop = full[3:5]
    cut = client.completions.create(model="logo", prompt=PROMPTS[5], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_adapters_health_metrics(setup, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["logo", setup["base"], *[s["name"] for s in MIXED_SPECS]]
    adapters = httpx.get(setup["main"].url + "/v1/adapters").json()["data"]
    assert [(a["name"], a["rank"]) for a in adapters] == [(s["name"], s["r"]) for s in MIXED_SPECS]
    assert adapters[4]["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert httpx.get(setup["main"].url + "/health").json()["status"] == "ok"
    assert f'id="max" type="number" value="24" min="1" max="{TOKENS_LIMIT}"' in httpx.get(setup["main"].url).text
    metrics = httpx.get(setup["main"].url + "/metrics").text
    for name in ("logo_requests_total", "logo_completion_tokens_total", "logo_queue_depth", "logo_batch_size_bucket",
                 "logo_route_seconds_bucket", "logo_adapter_selections_total"):
        assert name in metrics


# ------------------------------------------------------------------ batching
def test_greedy_alone_equals_with_31_others(setup):
    """32 concurrent requests of different lengths (rows join and leave at different steps) give each request
    the tokens it gets alone from the engine."""
    engine, server = setup["engine"], setup["main"]
    lengths = [4 + (i * 7) % 20 for i in range(32)]
    start = threading.Barrier(32)

    def ask(i: int) -> str:
        start.wait()
        body = {"model": "logo", "prompt": PROMPTS[i], "max_tokens": lengths[i], "temperature": 0}
        return post(server, "/v1/completions", body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    alone = [greedy(engine, p, n) for p, n in zip(PROMPTS, lengths)]
    assert together == alone
    batch_sizes = httpx.get(server.url + "/metrics").text
    assert 'logo_batch_size_bucket{le="1.0"}' in batch_sizes
    big = [line for line in batch_sizes.splitlines() if line.startswith("logo_batch_size_count")]
    small = [line for line in batch_sizes.splitlines() if line.startswith('logo_batch_size_bucket{le="8.0"}')]
    assert float(big[0].split()[-1]) > float(small[0].split()[-1])  # some steps ran more than 8 rows


def test_seeded_sampling_alone_equals_batched(setup):
    server = setup["main"]
    body = {"model": "logo", "prompt": PROMPTS[7], "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    alone = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, server, "/v1/completions", {**body, "seed": 100 + i}) for i in range(7)]
        mine = post(server, "/v1/completions", body).json()["choices"][0]["text"]
        [f.result() for f in futures]
    assert mine == alone
    other = post(server, "/v1/completions", {**body, "seed": 8}).json()["choices"][0]["text"]
    assert other != alone


# -------------------------------------------------------------- abuse, load
BAD_REQUESTS = {
    "malformed json": ("/v1/completions", '{"prompt": "hi",', "body"),
    "body not an object": ("/v1/completions", "[1, 2]", None),
    "missing prompt": ("/v1/completions", {"max_tokens": 2}, "prompt"),
    "prompt wrong type": ("/v1/completions", {"prompt": 5}, "prompt"),
    "empty prompt": ("/v1/completions", {"prompt": ""}, "prompt"),
    "blank prompt": ("/v1/completions", {"prompt": "   \n "}, "prompt"),
    "empty prompt list": ("/v1/completions", {"prompt": []}, "prompt"),
    "token id prompt": ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    "prompt over limit": ("/v1/completions", {"prompt": "x" * (PROMPT_LIMIT + 10)}, str(PROMPT_LIMIT)),
    "max_tokens as string": ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    "max_tokens zero": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    "max_tokens over limit": ("/v1/completions", {"prompt": "hi", "max_tokens": TOKENS_LIMIT + 1}, str(TOKENS_LIMIT)),
    "negative temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    "temperature over 2": ("/v1/completions", {"prompt": "hi", "temperature": 3}, "temperature"),
    "top_p zero": ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    "top_p over 1": ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    "seed not an integer": ("/v1/completions", {"prompt": "hi", "seed": 1.5}, "seed"),
    "stream not a bool": ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    "n over 1": ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    "too many stop strings": ("/v1/completions", {"prompt": "hi", "stop": list("abcde")}, "stop"),
    "unknown field": ("/v1/completions", {"prompt": "hi", "best_of_all": 3}, "best_of_all"),
    "more prompts than the queue holds": ("/v1/completions", {"prompt": ["hi"] * (MAX_QUEUE + 1)}, "--max-queue"),
    "prompt with a lone surrogate": ("/v1/completions", '{"prompt": "hi \\ud800"}', "Unicode"),
    "prompt far over the limit": ("/v1/completions", {"prompt": "x" * 2_000_000}, "characters"),
    "temperature NaN": ("/v1/completions", '{"prompt": "hi", "temperature": NaN}', "finite number from 0 to 2"),
    "body not UTF-8": ("/v1/completions", b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
    "key not Unicode": ("/v1/completions", '{"prompt": "hi", "\\ud800": 1}', "key that is not valid Unicode"),
    "stream_options without stream": ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
                                      "stream_options"),
    "unknown stream option": ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"usage": True}},
                              "stream_options.usage"),
    "unknown adapter": ("/v1/completions", {"prompt": "hi", "logo": {"adapters": {"nope": 1.0}}}, "nope"),
    "negative adapter weight": ("/v1/completions", {"prompt": "hi", "logo": {"adapters": {"a_r4": -1.0}}}, "weights"),
    "huge adapter weight": ("/v1/completions", {"prompt": "hi", "logo": {"adapters": {"a_r4": 1e308}}}, "at most"),
    "empty mixture": ("/v1/completions", {"prompt": "hi", "logo": {"adapters": {}}}, "logo.adapters"),
    "k over library": ("/v1/completions", {"prompt": "hi", "logo": {"k": 99}}, "logo.k"),
    "k zero": ("/v1/completions", {"prompt": "hi", "logo": {"k": 0}}, "logo.k"),
    "unknown strategy": ("/v1/completions", {"prompt": "hi", "logo": {"strategy": "vibes"}}, "strategy"),
    "base and mixture": ("/v1/completions", {"prompt": "hi", "logo": {"base": True, "adapters": {"a_r4": 1.0}}},
                         "logo"),
    "k with an adapter model": ("/v1/completions", {"prompt": "hi", "model": "a_r4", "logo": {"k": 1}}, "logo"),
    "chat without messages": ("/v1/chat/completions", {"model": "logo"}, "messages"),
    "chat empty messages": ("/v1/chat/completions", {"messages": []}, "messages"),
    "chat bad role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    "chat empty user message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": " "}]}, "empty"),
    "chat over the prompt limit": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}]},
                                   "messages (after the chat template) has"),
    "chat lone surrogate": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
                            "Unicode"),
    "content part that is not text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        "messages.0.content.1.type"),
    "token-id prompt": ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt.0"),
    "seed beyond int64": ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    "null prompt": ("/v1/completions", {"prompt": None}, "prompt"),
    "penalty over 2": ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    "completion logprobs": ("/v1/completions", {"prompt": "hi", "logprobs": 0}, "logprobs"),
    "chat logprobs": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
                      "log probabilities"),
    "chat top_logprobs": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                   "top_logprobs": 3}, "top_logprobs"),
    "chat null user content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]},
                               "no content"),
    "chat developer reaches the template as system": (
        "/v1/chat/completions", {"messages": [{"role": "developer", "content": "be brief"},
                                              {"role": "user", "content": "hi"}]}, "System role not supported"),
    "chat template refuses": ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                                                    {"role": "user", "content": "hi"}]},
                              "System role not supported"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_400_and_server_keeps_serving(setup, case):
    path, body, mentions = BAD_REQUESTS[case]
    response = post(setup["main"], path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if mentions:
        assert mentions in error["message"] or mentions == error["param"], error
    if path == "/v1/chat/completions" and mentions in ("Unicode", "System role not supported"):
        assert error["param"] == "messages"
    ok = post(setup["main"], "/v1/completions", {"prompt": "still there?", "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_path_and_method(setup):
    missing = httpx.get(setup["main"].url + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    for path, body in (("/v1/completions", {"prompt": "hi", "model": "gpt-17"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-17"})):
        unknown = post(setup["main"], path, body)  # an unknown model is a 404, as OpenAI answers it
        assert unknown.status_code == 404, unknown.text
        error = unknown.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-17" in error["message"]
    wrong = httpx.get(setup["main"].url + "/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert wrong.headers["allow"] == "POST"  # the exception's headers are kept
    plain = httpx.post(setup["main"].url + "/v1/completions", content='{"prompt": "hi"}',
                       headers={"Content-Type": "text/plain"})
    assert plain.status_code == 400 and "application/json" in plain.json()["error"]["message"]


def test_loadtest_counts_and_says_why_requests_fail(setup, capsys):
    from logo.errors import LogoError
    from logo.serve.loadtest import parse_levels, run_levels
    from tests.serve_helpers import free_port

    url = setup["main"].url
    results = run_levels(url, parse_levels("1,2"), 2, 4, 60.0, None, json_out=True, prompts=PROMPTS)
    assert [(r.concurrency, r.requests, r.ok, r.errors, r.lost) for r in results] == [(1, 2, 2, 0, 0), (2, 4, 4, 0, 0)]
    assert all(r.output_tokens >= r.ok and r.first_error is None for r in results)
    over = run_levels(url, [1], 1, TOKENS_LIMIT + 1, 60.0, None, json_out=False, prompts=PROMPTS)[0]
    assert (over.ok, over.errors) == (0, 1)
    assert "HTTP 400" in over.first_error and "--max-tokens-limit" in over.first_error
    assert "1 of 1 failed; the first: HTTP 400" in capsys.readouterr().err
    for bad_url, message in [(url + "/v1", "not the OpenAI base URL"), (f"http://127.0.0.1:{free_port()}",
                                                                         "cannot reach a server")]:
        with pytest.raises(LogoError, match=message):
            run_levels(bad_url, [1], 1, 4, 60.0, None, json_out=True)
    with pytest.raises(LogoError, match="comma-separated client counts"):
        parse_levels("1,x")


def test_api_key(setup):
    small = setup["small"]
    body = {"prompt": "hi", "max_tokens": 2}
    assert post(small, "/v1/completions", body).status_code == 401
    wrong = post(small, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert post(small, "/v1/completions", body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(small.url + "/health").status_code == 200  # health stays open


def test_full_queue_answers_429(setup):
    """Batch 1, queue 1: of 8 simultaneous long requests, one runs, one waits, the rest get 429."""
    small = setup["small"]
    headers = {"Authorization": f"Bearer {KEY}"}
    start = threading.Barrier(8)

    def ask(_i: int) -> httpx.Response:
        start.wait()
        return post(small, "/v1/completions", {"prompt": "hi", "max_tokens": 200, "temperature": 0}, headers=headers)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert small.alive()


def test_disconnect_frees_the_row(setup):
    server = setup["main"]
    body = {"model": "logo", "prompt": PROMPTS[1], "max_tokens": TOKENS_LIMIT, "temperature": 0}
    natural = post(server, "/v1/completions", body).json()["usage"]["completion_tokens"]
    if natural < 100:
        pytest.skip(f"the tiny model stopped by itself after {natural} tokens")

    def generated() -> float:
        lines = httpx.get(server.url + "/metrics").text.splitlines()
        return float(next(line for line in lines if line.startswith("logo_completion_tokens_total")).split()[-1])

    before = generated()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if '"text": "' in line and '"text": ""' not in line:
                break  # first token seen: hang up
    for _ in range(100):
        if httpx.get(server.url + "/health").json()["running"] == 0:
            break
        threading.Event().wait(0.05)
    assert httpx.get(server.url + "/health").json()["running"] == 0
    assert generated() - before < natural


def test_non_streamed_hang_up_frees_the_rows(setup):
    """Clients of plain (non-streamed) requests that hang up cancel their jobs: a list of 32 prompts and a chat
    (on the base model, which runs to max_tokens here) leave the batch long before their max_tokens, answered 499
    (client closed request), nothing logged."""
    server = setup["main"]

    def gone(endpoint: str) -> float:
        pattern = rf'logo_requests_total{{endpoint="{endpoint}",status="499"}} (\S+)'
        found = re.search(pattern, httpx.get(server.url + "/metrics").text)
        return float(found.group(1)) if found else 0.0

    def hang_up(path: str, body: dict) -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + path, json={**body, "model": setup["base"], "max_tokens": TOKENS_LIMIT,
                                                "temperature": 0}, timeout=0.5)

    before = gone("/v1/completions"), gone("/v1/chat/completions")
    log_before = len(server.log_file.read_text())
    with ThreadPoolExecutor(2) as pool:
        hung = [pool.submit(hang_up, "/v1/completions", {"prompt": PROMPTS}),
                pool.submit(hang_up, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]
        [f.result() for f in hung]
    for _ in range(60):
        if httpx.get(server.url + "/health").json()["running"] == 0:
            break
        threading.Event().wait(0.05)
    assert httpx.get(server.url + "/health").json()["running"] == 0
    for _ in range(20):  # the handler answers 499 once it sees the hang-up
        if (gone("/v1/completions"), gone("/v1/chat/completions")) == (before[0] + 1, before[1] + 1):
            break
        threading.Event().wait(0.1)
    assert (gone("/v1/completions"), gone("/v1/chat/completions")) == (before[0] + 1, before[1] + 1)
    log = server.log_file.read_text()[log_before:]
    assert "request failed" not in log and "Error" not in log, log


# ---------------------------------------------------------------- playground
def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_playground_in_headless_chromium(setup):
    """The page at / routes a prompt, draws one weight bar per selected adapter and streams the answer."""
    sync_api = pytest.importorskip("playwright.sync_api")
    prompt = "river number 1:"
    with sync_api.sync_playwright() as play:
        browser = play.chromium.launch(executable_path=chromium_binary(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(setup["main"].url + "/")
            page.fill("#prompt", prompt)
            page.fill("#max", "10")
            page.click("#go")
            page.wait_for_selector('#answer[data-done="1"]', timeout=60_000)
            names = page.locator(".bar .name").all_inner_texts()
            answer = page.locator("#answer").inner_text()
            error = page.locator("#status").inner_text()
            page.fill("#max", "0")  # refused: the status says why and the bars do not claim to be routing
            page.click("#go")
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('error')")
            refused = page.locator("#status").inner_text(), page.locator("#bars").inner_text()
        finally:
            browser.close()
    assert error == ""
    assert "max_tokens" in refused[0] and refused[1] == ""
    assert names == setup["engine"].route([prompt])[0].names
    assert answer.strip() == greedy(setup["engine"], prompt, 10).strip()
