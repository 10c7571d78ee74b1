"""The server's parts in-process: the scheduler's isolation of a failing request, per-row sampling against the
softmax written out, and incremental detokenizing with stop strings."""

from __future__ import annotations

import threading

import pytest
import torch

from logo.generation import GenerationSettings
from logo.router import RouterConfig
from logo.serve.sampling import RowSettings, choose, uniform
from logo.serve.scheduler import Job, Scheduler
from logo.serve.text_stream import TextStream
from logo.spec import EngineSpec
from tests.helpers import make_tokenizer


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_library):
    _model, root = tiny_library("llama")
    return EngineSpec(str(tiny_model_dir("llama")), str(root), RouterConfig(k=2), device="cpu").build()


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
                       top_p=torch.tensor([1.0, 1e-6, 1.0, 1.0]), seed=torch.tensor([1, 2, 3, 4]))
    tokens = choose(logits, rows, torch.zeros(4, dtype=torch.long))
    argmax = logits.argmax(-1)
    assert tokens[0] == argmax[0] and tokens[3] == argmax[3]
    assert tokens[1] == argmax[1]  # top_p that small keeps only the most likely token


def test_sampling_follows_the_softmax():
    """Over many seeds, one row's draws follow softmax(logits / T) (written out), and top-p drops the tail."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n, temperature = 4000, 0.8
    rows = RowSettings(greedy=torch.zeros(n, dtype=torch.bool), temperature=torch.full((n,), temperature),
                       top_p=torch.ones(n), seed=torch.arange(n) * 7919 + 11)
    tokens = choose(logits.expand(n, -1), rows, torch.full((n,), 3))
    expected = torch.exp(logits / temperature) / torch.exp(logits / temperature).sum()
    observed = torch.bincount(tokens, minlength=5).float() / n
    assert torch.allclose(observed, expected, atol=0.03)
    rows.top_p = torch.full((n,), 0.7)
    kept = torch.bincount(choose(logits.expand(n, -1), rows, torch.full((n,), 3)), minlength=5)
    assert kept[2:].sum() == 0 and kept[:2].min() > 0  # p(0)=.66 < .7 <= p(0)+p(1)


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

