"""A bounded load test of a loopback server: streamed completions from N concurrent clients.

Each level has ``concurrency`` clients send ``requests`` streamed greedy completions each, one after the
other (prompts from the calibration set, cycled), starting none after ``time_limit`` seconds (those still running
then get ``GRACE_S`` more to finish), and reports aggregate output tokens per second, time to first token and
latency (p50 / p95; null when no request succeeded), errors (the server refused the request or could not be
reached; the first one's reason is kept), and lost requests (sent but never finished: no ``[DONE]``, cut off
after the grace time, or a server silent for ``time_limit`` seconds). Before the first level the server's
``/health`` must answer, so a wrong ``--url`` fails at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import httpx

from logo.calibration import default_prompts
from logo.errors import LogoError

GRACE_S = 30
"""Seconds a level's running requests get to finish after its ``--time-limit``; then they count as lost."""


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    errors: int
    lost: int
    seconds: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50_s: float | None
    """Percentiles are None (JSON null) when no request of the level succeeded."""
    ttft_p95_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    first_error: str | None = None
    """The first failed request's reason (HTTP status and the server's message)."""


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL of this machine's loopback."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LogoError(f"--url {url!r}: give a URL with a scheme, e.g. http://127.0.0.1:8000")
    host = parsed.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LogoError(f"logo loadtest sends only to loopback (127.0.0.1, ::1, localhost), not {host!r}")
    return url.rstrip("/")


def check_server(url: str) -> None:
    """The server at ``url`` answers ``/health``; otherwise a one-line error that says what to fix."""
    if url.endswith("/v1"):
        raise LogoError(f"--url {url}: give the server's root (e.g. http://127.0.0.1:8000), not the OpenAI base "
                        "URL ending in /v1")
    try:
        response = httpx.get(f"{url}/health", timeout=10)
    except httpx.HTTPError as err:
        raise LogoError(f"cannot reach a server at {url} ({type(err).__name__}: {err}); start `logo serve` or "
                        "give its --url") from None
    if response.status_code != 200:
        raise LogoError(f"{url}/health answered {response.status_code}; is this a `logo serve` server?")


def _reason(status: int, body: bytes) -> str:
    """A refused request's reason: its HTTP status and the message of OpenAI's error body (else the body's start)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:200]
    return f"HTTP {status}: {message}"


def _message(error) -> str:
    """The message of an error chunk's ``error`` object (OpenAI's shape); anything else as JSON."""
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return json.dumps(error)[:200]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values``, rounded to the millisecond; None (JSON null, not NaN, which is not
    JSON) when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1], 3)


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, headers: dict) -> tuple:
    """``(status, ttft, latency, tokens, reason)``; status "ok", "error" or "lost" (reason: why not ok)."""
    body = {"model": "logo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                reason = _reason(response.status_code, await response.aread())
                return "error", None, time.perf_counter() - start, 0, reason
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return "error", None, time.perf_counter() - start, 0, f"in the stream: {_message(chunk['error'])}"
                if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.ConnectError as err:
        return "error", None, time.perf_counter() - start, 0, f"cannot connect: {err}"
    except (httpx.HTTPError, asyncio.TimeoutError) as err:
        return "lost", None, time.perf_counter() - start, 0, f"{type(err).__name__}: {err}"
    if not done:
        return "lost", ttft, time.perf_counter() - start, tokens, "the stream ended without [DONE]"
    return "ok", ttft, time.perf_counter() - start, tokens, None


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int, time_limit: float,
                    api_key: str | None, prompts: list[str] | None = None) -> LevelResult:
    """One level; ``prompts`` (default: the calibration set) are cycled."""
    prompts = prompts or default_prompts()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[tuple] = []
    total = requests * concurrency
    next_index = 0
    deadline = time.perf_counter() + time_limit

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            results.append(await _one(client, url, prompts[i % len(prompts)], max_tokens, headers))

    limits = httpx.Limits(max_connections=concurrency + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit), limits=limits) as client:
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(concurrency)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=time_limit + GRACE_S)
        except asyncio.TimeoutError:
            pass
    seconds = time.perf_counter() - start
    sent = next_index
    ok = [r for r in results if r[0] == "ok"]
    tokens = sum(r[3] for r in ok)
    errors = [r[4] for r in results if r[0] == "error"]
    return LevelResult(
        concurrency=concurrency, requests=sent, ok=len(ok), errors=sum(r[0] == "error" for r in results),
        lost=sent - len(ok) - sum(r[0] == "error" for r in results), seconds=round(seconds, 2),
        output_tokens=tokens, tokens_per_s=round(tokens / seconds, 2),
        ttft_p50_s=percentile([r[1] for r in ok if r[1] is not None], 50),
        ttft_p95_s=percentile([r[1] for r in ok if r[1] is not None], 95),
        latency_p50_s=percentile([r[2] for r in ok], 50),
        latency_p95_s=percentile([r[2] for r in ok], 95),
        first_error=errors[0] if errors else None,
    )


def parse_levels(text: str) -> list[int]:
    """``--concurrency``: comma-separated positive client counts."""
    try:
        levels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise LogoError(f"--concurrency {text!r}: give comma-separated client counts, e.g. 1,8,32") from None
    if not levels or any(c < 1 for c in levels):
        raise LogoError(f"--concurrency needs positive client counts, got {text!r}")
    return levels


def table_row(r: LevelResult) -> str:
    """One level as a row of the Markdown table; a percentile no request gave is ``-``."""
    cells = [r.concurrency, r.requests, r.ok, r.errors, r.lost, r.seconds, r.output_tokens, r.tokens_per_s,
             r.ttft_p50_s, r.ttft_p95_s, r.latency_p50_s, r.latency_p95_s]
    return "| " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |"


def run_levels(url: str, levels: list[int], requests: int, max_tokens: int, time_limit: float,
               api_key: str | None, json_out: bool, prompts: list[str] | None = None) -> list[LevelResult]:
    url = check_loopback(url)
    if not levels or any(c < 1 for c in levels):
        raise LogoError(f"--concurrency needs positive client counts, got {levels}")
    if requests < 1 or max_tokens < 1 or time_limit <= 0:
        raise LogoError("--requests-per-client and --max-tokens must be at least 1 and --time-limit positive")
    check_server(url)
    out = []
    if not json_out:
        print("| clients | requests | ok | errors | lost | s | out tok | tok/s | TTFT p50 | TTFT p95 | "
              "latency p50 | latency p95 |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for level in levels:
        result = asyncio.run(run_level(url, level, requests, max_tokens, time_limit, api_key, prompts))
        out.append(result)
        if json_out:
            print(json.dumps(asdict(result), allow_nan=False), flush=True)
        else:
            print(table_row(result), flush=True)
        if result.first_error is not None and not json_out:
            print(f"  {result.errors} of {result.requests} failed; the first: {result.first_error}", file=sys.stderr)
    return out
