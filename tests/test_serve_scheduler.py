"""The server's parts in-process: the scheduler's isolation of a failing request and its queue, per-row sampling
against the softmax written out, incremental detokenizing with stop strings, and the app's admission checks."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from logo.generation import GenerationSettings
from logo.router import RouterConfig, Selection
from logo.serve.admission import Catalog, settings_for
from logo.serve.api import ServeConfig, create_app
from logo.serve.sampling import Penalties, RowSettings, choice_seed, choose, count, penalize, uniform
from logo.serve.scheduler import Job, Scheduler, ShuttingDown
from logo.serve.text_stream import TextStream
from logo.spec import EngineSpec
from tests.helpers import make_tokenizer
from tests.serve_helpers import TINY_CHAT_TEMPLATE, penalized_greedy


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_library):
    _model, root = tiny_library("llama")
    return EngineSpec(str(tiny_model_dir("llama")), str(root), RouterConfig(k=2), device="cpu").build()


@pytest.fixture(scope="module")
def api(engine):
    """The app in-process: base model id "base", prompts up to 64 tokens, max_tokens up to 10, a chat template."""
    config = ServeConfig(base_id="base", max_prompt_tokens=64, max_tokens_limit=10)
    with TestClient(create_app(engine, config)) as client:
        client.app.state.tokenizer.chat_template = TINY_CHAT_TEMPLATE
        yield client


def refusal(client: TestClient, path: str, body: str | bytes | dict) -> dict:
    """The error of a request that must be a 400 (a str or bytes body is sent as it is)."""
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    return response.json()["error"]


def run_jobs(scheduler: Scheduler, prompts: list[str], tokens: int = 6) -> list[tuple[list[int], str]]:
    """Submit one job per prompt at once; ``(token ids, final event kind or error message)`` per job."""
    results: list = [None] * len(prompts)
    done = threading.Semaphore(0)

    def listener(i: int):
        ids: list[int] = []

        def on_event(event):
            if event.kind == "token":
                ids.append(event.token)
            elif event.kind in ("done", "error"):
                results[i] = (ids, event.kind if event.kind == "done" else event.message)
                done.release()

        return on_event

    scheduler.submit([Job(p, GenerationSettings(max_new_tokens=tokens), on_event=listener(i))
                      for i, p in enumerate(prompts)])
    for _ in prompts:
        assert done.acquire(timeout=60)
    return results


def test_failing_request_does_not_leak(engine):
    """A prompt the engine refuses (over 2048 tokens) fails alone; the requests admitted with it are unharmed."""
    scheduler = Scheduler(engine, max_batch_size=8)
    try:
        prompts = ["first prompt", "x" * 3000, "third one"]
        results = run_jobs(scheduler, prompts)
        assert "over the limit" in results[1][1]
        alone = engine.generate([prompts[0], prompts[2]], max_new_tokens=6, batch_size=1)
        for (ids, kind), gen in zip([results[0], results[2]], alone):
            assert kind == "done"
            assert engine.tokenizer.decode(ids, skip_special_tokens=True) == gen.text
        assert run_jobs(scheduler, ["after the failure"])[0][1] == "done"
    finally:
        scheduler.close()


def test_choose_greedy_and_sampled_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 7)
    rows = RowSettings(greedy=torch.tensor([True, False, False, True]), temperature=torch.tensor([1.0, 1.0, 0.5, 1.0]),
                       top_p=torch.tensor([1.0, 1e-6, 1.0, 1.0]), seed=torch.tensor([1, 2, 3, 4]),
                       presence=torch.zeros(4), frequency=torch.zeros(4))
    tokens = choose(logits, rows, torch.zeros(4, dtype=torch.long))
    argmax = logits.argmax(-1)
    assert tokens[0] == argmax[0] and tokens[3] == argmax[3]
    assert tokens[1] == argmax[1]  # top_p that small keeps only the most likely token


def test_sampling_follows_the_softmax():
    """Over many seeds, one row's draws follow softmax(logits / T) (written out), and top-p drops the tail."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n, temperature = 4000, 0.8
    rows = RowSettings(greedy=torch.zeros(n, dtype=torch.bool), temperature=torch.full((n,), temperature),
                       top_p=torch.ones(n), seed=torch.arange(n) * 7919 + 11, presence=torch.zeros(n),
                       frequency=torch.zeros(n))
    tokens = choose(logits.expand(n, -1), rows, torch.full((n,), 3))
    expected = torch.exp(logits / temperature) / torch.exp(logits / temperature).sum()
    observed = torch.bincount(tokens, minlength=5).float() / n
    assert torch.allclose(observed, expected, atol=0.03)
    rows.top_p = torch.full((n,), 0.7)
    kept = torch.bincount(choose(logits.expand(n, -1), rows, torch.full((n,), 3)), minlength=5)
    assert kept[2:].sum() == 0 and kept[:2].min() > 0  # p(0)=.66 < .7 <= p(0)+p(1)


def test_penalties_are_openais_formula():
    """``logit - frequency * c - presence * (c > 0)``, written out element by element; rows without a penalty
    keep their logits, and greedy rows choose after the penalty."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, generator=generator)
    counts = torch.zeros(3, 6, dtype=torch.int32)
    for row, tokens in enumerate([[1, 1, 4], [], [0, 2, 2, 2]]):
        for token in tokens:
            count(counts[row:row + 1], torch.tensor([token]))
    assert counts[2].tolist() == [1, 0, 3, 0, 0, 0]
    rows = RowSettings(greedy=torch.ones(3, dtype=torch.bool), temperature=torch.ones(3), top_p=torch.ones(3),
                       seed=torch.zeros(3, dtype=torch.long), presence=torch.tensor([0.5, 1.0, 0.0]),
                       frequency=torch.tensor([1.5, 0.0, -0.25]))
    expected = logits.clone()
    for b in range(3):
        for j in range(6):
            c = int(counts[b, j])
            expected[b, j] -= float(rows.frequency[b]) * c + float(rows.presence[b]) * (1.0 if c > 0 else 0.0)
    assert torch.allclose(penalize(logits, counts, rows), expected)
    assert torch.equal(choose(logits, rows, torch.zeros(3, dtype=torch.long), counts), expected.argmax(-1))


def test_penalized_rows_in_a_batch_match_the_formula(engine):
    """Greedy requests with presence/frequency penalties, batched beside requests without any and joining while
    they decode, get the tokens the penalties written out give (and the others the engine's own tokens)."""
    prompts = ["one two three", "a b a b a b", "the cat sat on", "x y z"]
    penalties = [Penalties(0.0, 2.0), Penalties(), Penalties(1.5, 0.5), Penalties()]
    tokens = 12
    with torch.no_grad():
        expected = [penalized_greedy(engine, p, tokens, pen) for p, pen in zip(prompts, penalties)]
        plain = penalized_greedy(engine, prompts[0], tokens, Penalties())
    assert expected[0] != plain  # the penalty changes this prompt's tokens
    scheduler = Scheduler(engine, max_batch_size=8, max_prefill_rows=2)  # the later two join a running batch
    try:
        results: list = [None] * len(prompts)
        done = threading.Semaphore(0)

        def listener(i: int):
            ids: list[int] = []

            def on_event(event):
                if event.kind == "token":
                    ids.append(event.token)
                elif event.kind in ("done", "error"):
                    results[i] = ids if event.kind == "done" else event.message
                    done.release()
            return on_event

        scheduler.submit([Job(p, GenerationSettings(max_new_tokens=tokens), Selection([], []), penalties=pen,
                              on_event=listener(i)) for i, (p, pen) in enumerate(zip(prompts, penalties))])
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        scheduler.close()
    assert results == expected


def test_uniform_is_spread_and_reproducible():
    u = uniform(torch.arange(10000), torch.zeros(10000, dtype=torch.long))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, uniform(torch.arange(10000), torch.zeros(10000, dtype=torch.long)))
    assert not torch.equal(u, uniform(torch.arange(10000), torch.ones(10000, dtype=torch.long)))


def test_text_stream_utf8_and_stop_strings():
    tokenizer = make_tokenizer()
    text = "héllo wörld, bye"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [])
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    stream = TextStream(tokenizer, ["wör", "zzz"])
    pieces = [stream.add(i) for i in ids]
    assert stream.stopped and "".join(pieces) + stream.finish() == "héllo "


@pytest.mark.parametrize("stop", ["ジア", "ログ", "ö!"])
def test_text_stream_holds_a_stop_strings_start_while_the_next_character_arrives(stop):
    """Byte by byte, a stop string's second character arrives in pieces (U+FFFD until complete): its first character
    must be held back all the while, so no part of the stop string is ever handed out."""
    tokenizer = make_tokenizer()
    text = "アネットアップログアジアのアネ wö! end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [stop])
    pieces = [stream.add(i) for i in ids]
    assert stream.stopped and "".join(pieces) + stream.finish() == text[: text.index(stop)]



@pytest.mark.parametrize("done", ["010100", "110", "001", "11", "000", "100001", "0111"])
def test_fill_holes_moves_one_row_per_hole(done):
    """Rows that leave: each hole below the new batch size takes one row from beyond it; every other kept row
    stays in its place (the mixture then moves one row per hole)."""
    from logo.serve.scheduler import fill_holes

    flags = torch.tensor([c == "1" for c in done])
    order = fill_holes(flags)
    kept = [i for i, c in enumerate(done) if c == "0"]
    assert sorted(order.tolist()) == kept
    size = len(kept)
    assert all(order[i] == i for i in kept if i < size)
    assert sum(int(order[p]) != p for p in range(size)) == sum(c == "1" for c in done[:size])


def test_prefill_failure_while_rows_run_loses_nothing(engine):
    """A newcomer whose prefill fails while other rows decode gets the error; the rows that were running and the
    request admitted with it still get exactly the tokens they get alone (the mixture is laid out again)."""
    scheduler = Scheduler(engine, max_batch_size=8)
    model = scheduler.model
    marker = engine.tokenizer.convert_tokens_to_ids("~")

    def failing_prefill(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == marker).any()):
            raise RuntimeError("prefill failed on purpose")
        return model(*args, **kwargs)

    scheduler.model = failing_prefill
    try:
        results: dict[int, tuple] = {}
        done = threading.Semaphore(0)
        prompts = ["a long running one", "joins later", "bad ~ prompt"]

        def listener(i):
            ids: list[int] = []

            def on_event(event):
                if event.kind == "token":
                    ids.append(event.token)
                    if i == 0 and len(ids) == 2:  # row 0 is decoding: now two newcomers arrive together
                        scheduler.submit([Job(p, GenerationSettings(max_new_tokens=6), on_event=listener(j))
                                          for j, p in ((1, prompts[1]), (2, prompts[2]))])
                elif event.kind in ("done", "error"):
                    results[i] = (ids, event.kind if event.kind == "done" else event.message)
                    done.release()

            return on_event

        scheduler.submit([Job(prompts[0], GenerationSettings(max_new_tokens=12), on_event=listener(0))])
        for _ in prompts:
            assert done.acquire(timeout=60)
        assert "prefill failed on purpose" in results[2][1]
        for i, tokens in ((0, 12), (1, 6)):
            alone = engine.generate([prompts[i]], max_new_tokens=tokens, batch_size=1)[0]
            assert results[i][1] == "done"
            assert engine.tokenizer.decode(results[i][0], skip_special_tokens=True) == alone.text
    finally:
        scheduler.close()


def test_batch_retried_alone_is_routed_once(engine):
    """When a batch's prefill fails after its jobs were routed, the jobs are admitted again one by one; each
    still gets exactly one ``routed`` event (a second would repeat the stream's role / ``logo`` chunk)."""
    scheduler = Scheduler(engine, max_batch_size=8)
    model = scheduler.model
    marker = engine.tokenizer.convert_tokens_to_ids("~")

    def failing_prefill(*args, **kwargs):
        if bool((kwargs["input_ids"] == marker).any()):
            raise RuntimeError("prefill failed on purpose")
        return model(*args, **kwargs)

    scheduler.model = failing_prefill
    try:
        events: list[list[str]] = [[], []]
        done = threading.Semaphore(0)

        def listener(i):
            def on_event(event):
                events[i].append(event.kind)
                if event.kind in ("done", "error"):
                    done.release()
            return on_event

        scheduler.submit([Job(p, GenerationSettings(max_new_tokens=3), on_event=listener(i))
                          for i, p in enumerate(["a good prompt", "bad ~ prompt"])])
        for _ in range(2):
            assert done.acquire(timeout=60)
        assert events[0].count("routed") == 1 and events[0][-1] == "done", events[0]
        assert events[1] == ["routed", "error"]
        counted = sum(sample.value for metric in scheduler.metrics.selections.collect() for sample in metric.samples
                      if sample.name.endswith("_total"))
        assert counted == 2 * engine.router.config.k  # each job's selection counted once, not again on its retry
    finally:
        scheduler.close()


def test_submit_while_shutting_down_is_a_503(engine):
    """A request that arrives while the server shuts down gets a 503 (no Retry-After) saying so, not a 500."""
    with TestClient(create_app(engine, ServeConfig(base_id="base"))) as client:
        client.app.state.scheduler.close()
        for stream in (False, True):
            response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": stream})
            assert response.status_code == 503, response.text
            assert "retry-after" not in response.headers
            error = response.json()["error"]
            assert "shutting down" in error["message"] and error["type"] == "server_error"
    with pytest.raises(ShuttingDown):
        scheduler = Scheduler(engine)
        scheduler.close()
        scheduler.submit([Job("hi", GenerationSettings(max_new_tokens=1))])


def test_cancelled_jobs_leave_the_queue(engine):
    """A job whose client went away while it waited no longer counts against --max-queue or the queue depth."""
    scheduler = Scheduler(engine, max_batch_size=1, max_queue=1)
    scheduler.stops = scheduler.stops[:0]  # the running row ends at its max_new_tokens, never earlier
    model = scheduler.model

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return model(*args, **kwargs)

    scheduler.model = slow
    running = threading.Event()
    first = Job("a long running one", GenerationSettings(max_new_tokens=300), on_event=lambda _event: running.set())
    try:
        scheduler.submit([first])
        assert running.wait(60)  # admitted: the batch (of 1) is full, so the next job waits
        waiting = Job("waits", GenerationSettings(max_new_tokens=2))
        scheduler.submit([waiting])
        assert scheduler.queue_depth == 1
        waiting.cancelled = True
        assert scheduler.queue_depth == 0
        scheduler.submit([Job("takes its place", GenerationSettings(max_new_tokens=2))])
        assert scheduler.queue_depth == 1
    finally:
        first.cancelled = True
        scheduler.close()


def test_tiny_temperature_is_greedy():
    catalog = Catalog("logo", "base", [], RouterConfig(k=1), 64, 16, 4, None)
    assert not settings_for(4, 16, 1e-40, 1.0, None, 1, catalog).do_sample
    assert settings_for(4, 16, 1e-3, 1.0, None, 1, catalog).do_sample


def test_router_override_checked_before_queueing(tiny_model_dir, tiny_library):
    """A logo.strategy the server cannot route with (no calibration statistics for it) is a 400 naming
    logo.strategy before anything is queued, streamed or not; the server's own strategy still routes."""
    _model, root = tiny_library("llama")
    engine = EngineSpec(str(tiny_model_dir("llama")), str(root), RouterConfig(k=2, calibration="mean"),
                        device="cpu").build()
    engine.library.calibration = {engine.router.signal_key: {"values": [1.0] * len(engine.library)}}
    with TestClient(create_app(engine, ServeConfig(base_id="base"))) as client:
        for stream in (False, True):
            body = {"prompt": "hi", "max_tokens": 2, "stream": stream, "logo": {"strategy": "entropy"}}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "logo.strategy"
            assert "calibration statistics" in response.json()["error"]["message"]
        body = {"prompt": "hi", "max_tokens": 2, "logo": {"strategy": "norm", "k": 1}}
        assert client.post("/v1/completions", json=body).status_code == 200


def test_base_model_takes_no_adapters(api):
    """logo.adapters with the base model's id is refused (it ran the adapters), naming the id that takes them."""
    error = refusal(api, "/v1/completions", {"prompt": "hi", "model": "base", "logo": {"adapters": {"a_r4": 1.0}}})
    assert error["param"] == "model"
    assert "'base' is the base model, which takes no adapters" in error["message"]
    assert "set model to 'logo'" in error["message"]
    body = {"prompt": "hi", "model": "base", "max_tokens": 1, "logo": {"base": True}}
    assert api.post("/v1/completions", json=body).json()["logo"]["selected"] == []


def test_chat_refusals_name_what_the_client_sent(api):
    """A chat's limits are about the prompt its template makes of the messages, and say so (not "messages 0");
    a message that is not valid Unicode is named by its index."""
    long = refusal(api, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200}]})
    assert long["message"].startswith("messages (after the chat template) has ")
    assert "tokens, over this server's limit of 64" in long["message"] and long["code"] == "prompt_too_long"
    body = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok \\ud800"}]}'
    broken = refusal(api, "/v1/chat/completions", body)
    assert broken["message"].startswith("messages.1 (assistant) content is not valid Unicode (a lone surrogate "
                                        "at character 3)")
    assert broken["param"] == "messages"


@pytest.mark.parametrize(("body", "message", "param"), [
    (b'{"prompt": "caf\xe9"}', "the body is not valid UTF-8 (byte 0xe9 at offset 15)", None),
    ('{"prompt": "hi", "\\ud800": 1}', "the body has a key that is not valid Unicode ('\\ud800'", None),
    ('{"prompt": "hi", "logo": {"\\udc00": 1}}', "logo has a key that is not valid Unicode ('\\udc00'", "logo"),
    ('{"prompt": "hi",', "the body is not valid JSON: Expecting property name enclosed in double quotes at "
                        "character 16", None),
])
def test_body_errors_say_what_is_wrong(api, body, message, param):
    """A body of invalid UTF-8, a key that is a lone surrogate or broken JSON is a 400 that says which (FastAPI's
    "There was an error parsing the body", pydantic's "unable to parse raw data as a unicode string")."""
    error = refusal(api, "/v1/completions", body)
    assert error["message"].startswith(message), error
    assert error["param"] == param


@pytest.mark.parametrize(("field", "value", "says"), [
    ("temperature", "NaN", "from 0 to 2, got nan"), ("temperature", "3", "from 0 to 2, got 3"),
    ("top_p", "Infinity", "above 0 and at most 1, got inf"), ("top_p", "0", "above 0 and at most 1, got 0"),
    ("presence_penalty", "-Infinity", "from -2 to 2, got -inf"), ("frequency_penalty", "NaN", "from -2 to 2, got nan"),
])
def test_non_finite_numbers_say_the_range(api, field, value, says):
    """NaN and the infinities (Python's json reads them) are refused with the whole range, not "less than or
    equal to 2" (NaN fails every comparison); a value out of range gets the same message."""
    error = refusal(api, "/v1/completions", f'{{"prompt": "hi", "{field}": {value}}}')
    assert error["message"] == f"{field}: must be a finite number {says}"
    assert error["param"] == field


def test_playground_default_respects_the_token_limit(api, engine):
    """The page's max tokens starts at 24, or at --max-tokens-limit where that is lower (a first request at 24
    was refused), and the input's max is the limit."""
    assert 'id="max" type="number" value="10" min="1" max="10"' in api.get("/").text
    assert 'value="24" min="1" max="512"' in TestClient(create_app(engine, ServeConfig(base_id="base"))).get("/").text


def test_batched_routing_scores_are_the_unpadded_ones_up_to_rounding(engine):
    """A prompt routed in a left-padded batch gets the adapters and (to float32 rounding) the scores it gets alone.
    The scores are not bit-equal: the batch's matmuls round differently (measured about 5e-7 relative on CPU, 2e-7
    for a batch of equal lengths without any padding; the attention masks padding exactly)."""
    prompts = ["apple number 0:", "a much longer prompt about rivers, stones and clouds, number 17:"]
    routed: list[list[dict]] = []
    done = threading.Semaphore(0)

    def on_event(event):
        if event.kind == "routed":
            routed.append(event.selected)
            done.release()

    scheduler = Scheduler(engine, max_batch_size=8)
    try:
        scheduler.submit([Job(p, GenerationSettings(max_new_tokens=1), on_event=on_event if i == 0 else lambda e: None)
                          for i, p in enumerate(prompts)])
        assert done.acquire(timeout=60)
    finally:
        scheduler.close()
    alone = engine.route(prompts[:1])[0]
    assert [s["name"] for s in routed[0]] == alone.names
    assert [s["score"] for s in routed[0]] == pytest.approx(alone.scores, rel=1e-4)


def test_a_chat_prompt_keeps_one_bos_where_the_tokenizer_adds_it_too():
    """A template that writes ``{{ bos_token }}`` (Llama-3's) under a tokenizer that prepends BOS itself: the prompt
    as the engine tokenizes it starts with one BOS, not two; a tokenizer that adds none keeps the template's."""
    from tokenizers import processors

    from logo.serve.api import without_added_bos

    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    plain = make_tokenizer()
    adding = make_tokenizer()
    bos = adding.bos_token_id
    adding.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    assert adding("hi")["input_ids"][0] == bos and plain("hi")["input_ids"][0] != bos
    for tokenizer in (plain, adding):
        tokenizer.chat_template = template
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        ids = tokenizer(without_added_bos(tokenizer, text))["input_ids"]
        assert ids[0] == bos and ids[1] != bos, (tokenizer is adding, ids[:3])
        assert tokenizer.decode(ids, skip_special_tokens=True) == "hi\n"


def test_every_bit_of_a_seed_counts():
    """Seeds differing only in their top bits (2**62, the sign) or by 2**32 draw other sequences; 2,000 seeds give
    2,000 distinct 4-step sequences (the earlier fold kept 62 bits and folded the seed before the step)."""
    base = torch.tensor([5, 5 + 2**62, 5 - 2**63, 5 + 2**32, -1, 2**63 - 1], dtype=torch.long)
    steps = [uniform(base, torch.full_like(base, s)) for s in range(4)]
    sequences = {tuple(float(u[i]) for u in steps) for i in range(len(base))}
    assert len(sequences) == len(base)
    seeds = torch.arange(-1000, 1000, dtype=torch.long) * 0x100000001
    draws = torch.stack([uniform(seeds, torch.full_like(seeds, s)) for s in range(4)], 1)
    assert len({tuple(row.tolist()) for row in draws}) == len(seeds)


def test_a_seeded_list_of_identical_prompts_gives_distinct_choices(api):
    """A list of prompts is how this server gives several choices (it refuses n > 1): with a seed, each choice
    draws with its own seed (choice_seed), the first with the request's own, so it equals the prompt sent alone."""
    body = {"prompt": ["Once upon a time"] * 4, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    texts = [c["text"] for c in api.post("/v1/completions", json=body).json()["choices"]]
    assert len(set(texts)) > 1, texts
    alone = api.post("/v1/completions", json={**body, "prompt": "Once upon a time"}).json()["choices"][0]["text"]
    assert texts[0] == alone
    again = [c["text"] for c in api.post("/v1/completions", json=body).json()["choices"]]
    assert again == texts
    assert choice_seed(5, 0) == 5 and choice_seed(None, 3) is None
    assert len({choice_seed(seed, i) for seed in (-1, 0, 5, 2**63 - 1) for i in range(1, 50)}) == 4 * 49
    assert all(-(2**63) <= choice_seed(seed, i) < 2**63 for seed in (-(2**63), -1, 2**63 - 1) for i in range(9))


def test_a_stop_string_of_the_replacement_character_waits_for_the_character():
    """U+FFFD stands for a character whose bytes are still arriving: a stop string holding it must not fire on
    that placeholder (it fired on the first byte of an emoji). A stop string ending in held-back text is still
    found when the choice finishes."""
    tokenizer = make_tokenizer()
    text = "ok 😀🎉 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ["\ufffd"])
    pieces = [stream.add(i) for i in ids]
    assert not stream.stopped and "".join(pieces) + stream.finish() == text
    cut = tokenizer("ok 😀", add_special_tokens=False)["input_ids"][:-1]  # the choice ends inside the emoji
    assert tokenizer.decode(cut).endswith("\ufffd")
    stream = TextStream(tokenizer, ["\ufffd"])
    pieces = [stream.add(i) for i in cut]
    assert not stream.stopped and "".join(pieces) + stream.finish() == "ok " and stream.stopped


def test_a_request_is_refused_at_its_first_prompt_over_the_limit():
    """Tokenizing every prompt of a request before checking any took 14 s for 256 long prompts: each prompt is
    tokenized and checked in turn."""
    from logo.serve.admission import ApiError, prompt_lengths

    tokenizer, calls = make_tokenizer(), []

    class Counting:
        def __call__(self, text, **kwargs):
            calls.append(text)
            return tokenizer(text, **kwargs)

    catalog = Catalog("logo", "base", [], RouterConfig(), 8, 10, 256, None)
    prompts = ["ok", "much too long for eight tokens " * 3, *["short"] * 50]
    with pytest.raises(ApiError, match="prompt 1 has .* tokens, over this server's limit of 8"):
        prompt_lengths(Counting(), prompts, catalog)
    assert len(calls) == 2
    assert prompt_lengths(Counting(), ["a b", "c"], catalog) == [len(tokenizer(p)["input_ids"]) for p in ("a b", "c")]


def test_tokenizing_a_request_leaves_the_event_loop_free(api, monkeypatch):
    """The prompts of a request are tokenized (and a chat rendered) off the event loop: /health answers while a
    slow one is being tokenized."""
    import logo.serve.api as api_module
    from logo.serve.admission import prompt_lengths

    started = threading.Event()

    def slow(*args, **kwargs):
        started.set()
        time.sleep(1.5)
        return prompt_lengths(*args, **kwargs)

    monkeypatch.setattr(api_module, "prompt_lengths", slow)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(api.post("/v1/completions",
                                                                     json={"prompt": "hi", "max_tokens": 1})))
    worker.start()
    assert started.wait(10)
    start = time.perf_counter()
    assert api.get("/health").status_code == 200
    waited = time.perf_counter() - start
    worker.join(30)
    assert answers and answers[0].status_code == 200
    assert waited < 1.0, waited


def test_new_tokens_must_fit_the_models_context(api):
    """A prompt and its new tokens must fit the model's context (max_position_embeddings; here made 20 tokens):
    a max_tokens asked for that does not fit is refused with OpenAI's code, the server's default is shortened."""
    catalog = api.app.state.catalog
    tokens = len(api.app.state.tokenizer("count with me: one two three four five six seven")["input_ids"])
    saved, catalog.context_tokens = catalog.context_tokens, tokens + 4
    try:
        body = {"prompt": ["hi", "count with me: one two three four five six seven"], "max_tokens": 5}
        error = refusal(api, "/v1/completions", body)
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
        assert error["message"] == (f"max_tokens=5 does not fit: prompt 1 has {tokens} tokens and this model's "
                                    f"context is {tokens + 4}; ask for at most 4")
        answer = api.post("/v1/completions", json={**body, "max_tokens": 4}).json()
        assert answer["usage"]["completion_tokens"] <= 8
        default = api.post("/v1/completions", json={"prompt": body["prompt"][1], "temperature": 0}).json()
        assert default["usage"]["completion_tokens"] <= 4
        catalog.context_tokens = tokens
        error = refusal(api, "/v1/completions", {"prompt": body["prompt"][1]})
        assert error["message"].startswith(f"prompt 0 has {tokens} tokens, which fill this model's context of")
    finally:
        catalog.context_tokens = saved
    assert saved == 512  # the tiny model's max_position_embeddings


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_chunks_carry_openais_fields(api, path):
    """Raw chunks as OpenAI sends them: no ``usage`` field unless the stream asked for it (then null in every
    chunk but the last), and the chat's last delta is ``{}`` (not nulls)."""
    body = {"max_tokens": 3, "stream": True, **({"messages": [{"role": "user", "content": "hi"}]}
                                                if "chat" in path else {"prompt": "hi"})}

    def chunks(extra: dict) -> list[dict]:
        text = api.post(path, json={**body, **extra}).text
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    plain = chunks({})
    assert all("usage" not in c for c in plain)
    asked = chunks({"stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in asked[:-1]) and asked[-1]["usage"]["completion_tokens"] >= 1
    if "chat" in path:
        deltas = [c["choices"][0]["delta"] for c in plain]
        assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
        assert plain[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all(set(d) == {"content"} for d in deltas[1:-1])
