"""The HTTP API: OpenAI's completions and chat completions (plain and streamed as server-sent events), the
model and adapter lists, health, Prometheus metrics, the routing playground, errors in OpenAI's body.

Handlers only check and translate: a request becomes one :class:`~logo.serve.scheduler.Job` per prompt, the
scheduler's worker thread does all model work, and its events come back onto the event loop in one call per
step. A client that goes away cancels its jobs, so its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.generation import MAX_PROMPT_TOKENS, GenerationSettings
from logo.router import RouterConfig, Selection
from logo.serve.admission import (
    ApiError,
    Catalog,
    RouterOverrides,
    check_logprobs,
    choose_mixture,
    context_tokens,
    fit_context,
    prompt_lengths,
    settings_for,
    stop_strings,
)
from logo.serve.metrics import Metrics
from logo.serve.sampling import Penalties, choice_seed
from logo.serve.scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown
from logo.serve.schemas import (
    AdapterCard,
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorDetail,
    LogoInfo,
    ModelCard,
    Usage,
)
from logo.serve.text_stream import TextStream

log = logging.getLogger("logo.serve")
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_TOKENS = 256
PLAYGROUND_TOKENS = 24  # the playground's max tokens, unless --max-tokens-limit is lower
RETRY_AFTER_S = 1
DISCONNECT_CHECK_S = 0.5  # how often a non-streamed request looks for its client having gone
CLIENT_GONE = 499  # nginx's "client closed request": no one reads it, but the request metrics count it
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/adapters", "/v1/completions", "/v1/chat/completions")


@dataclass
class ServeConfig:
    """How the server answers: the ids clients name, the batch and queue sizes, the limits, the key."""

    base_id: str
    routed_id: str = "logo"
    max_batch_size: int = 32
    max_queue: int = 256
    max_prefill_rows: int = 8
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_tokens_limit: int = 512
    api_key: str | None = None

    def __post_init__(self) -> None:
        """Checks itself (named by the `logo serve` flags), so the command fails before any model loads."""
        if not 1 <= self.max_prompt_tokens <= MAX_PROMPT_TOKENS:
            raise LogoError(f"--max-prompt-tokens must be between 1 and {MAX_PROMPT_TOKENS}, "
                            f"got {self.max_prompt_tokens}")
        for flag, value in (("--max-tokens-limit", self.max_tokens_limit), ("--max-batch-size", self.max_batch_size),
                            ("--max-queue", self.max_queue), ("--max-prefill-rows", self.max_prefill_rows)):
            if value < 1:
                raise LogoError(f"{flag} must be at least 1, got {value}")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Guard:
    """The API key check on ``/v1/`` and the request count per endpoint and status, as plain ASGI middleware
    (Starlette's ``BaseHTTPMiddleware`` would hide a client's disconnect from the handlers)."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        if self.api_key and path.startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                self.metrics.requests.labels(endpoint=endpoint, status="401").inc()
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        status = 500  # what Starlette answers when the app raises before it starts a response

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


class Exchange:
    """One HTTP request's jobs (one per prompt), their events, and their text so far."""

    def __init__(self, prompts: list[str], lengths: list[int], settings: GenerationSettings,
                 selection: Selection | None, router: RouterConfig | None, stops: list[str], app_state,
                 penalties: Penalties = Penalties()) -> None:
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs = [Job(p, replace(settings, seed=choice_seed(settings.seed, i)), selection, router, penalties,
                         on_event=self._listener(i))
                     for i, p in enumerate(prompts)]
        self.lengths = lengths
        self.streams = [TextStream(app_state.tokenizer, stops) for _ in prompts]
        self.info: list[LogoInfo | None] = [None] * len(prompts)
        self.reasons: list[str | None] = [None] * len(prompts)
        self.remaining = set(range(len(prompts)))
        self.metrics: Metrics = app_state.metrics
        self.started = time.perf_counter()
        self.first_token = [True] * len(prompts)
        self.gone = False
        """The client disconnected (seen by :meth:`updates`); the jobs are cancelled."""
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        try:
            app_state.scheduler.submit(self.jobs)
        except QueueFull as err:
            raise ApiError(429, str(err), code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), code="shutting_down", kind="server_error") from None
        self.metrics.prompt_tokens.inc(sum(lengths))

    def _listener(self, index: int):
        return lambda event: self.queue.put_nowait((index, event))

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    async def updates(self, request: Request | None) -> AsyncIterator[tuple[int, str, str | None]]:
        """``(choice, new text, finish reason or None)`` as events come in; ``request`` given: stop waiting
        (and cancel) when its client disconnects."""
        checked = time.perf_counter()
        while self.remaining:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                index, event = -1, None
            if request is not None and time.perf_counter() - checked >= DISCONNECT_CHECK_S:
                checked = time.perf_counter()
                if await request.is_disconnected():
                    self.gone = True
                    self.cancel()
                    return
            if event is None:
                continue
            if index not in self.remaining:
                continue
            stream = self.streams[index]
            if event.kind == "routed":
                self.info[index] = LogoInfo(selected=event.selected, abstained=event.abstained)
                yield index, "", None
            elif event.kind == "token":
                if self.first_token[index]:
                    self.first_token[index] = False
                    self.metrics.ttft_seconds.observe(time.perf_counter() - self.started)
                text = stream.add(event.token)
                if stream.stopped:
                    self.jobs[index].cancelled = True
                    yield index, text, self._end(index, "stop")
                elif text:
                    yield index, text, None
            elif event.kind == "done":
                yield index, stream.finish(), self._end(index, event.reason)
            else:
                self.cancel()
                if event.reason == "invalid":
                    raise ApiError(400, event.message)
                raise ApiError(500, f"generation failed: {event.message}", kind="server_error")

    def _end(self, index: int, reason: str) -> str:
        self.remaining.discard(index)
        self.reasons[index] = reason
        return reason

    def usage(self) -> Usage:
        completion = sum(len(s.tokens) for s in self.streams)
        prompt = sum(self.lengths)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def create_app(engine: LoGoEngine, config: ServeConfig) -> FastAPI:
    """The FastAPI application; its scheduler (and worker thread) lives as long as the app's lifespan."""
    metrics = Metrics()
    catalog = Catalog(config.routed_id, config.base_id, list(engine.library.names), engine.router.config,
                      config.max_prompt_tokens, config.max_tokens_limit, config.max_queue,
                      RouterOverrides(engine.model, engine.library), context_tokens(engine.model))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def dispatch(events: list[tuple[Job, Event]]) -> None:
            for job, event in events:
                job.on_event(event)

        def deliver(events: list[tuple[Job, Event]]) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(dispatch, events)

        app.state.scheduler = Scheduler(engine, config.max_batch_size, config.max_queue, deliver, metrics,
                                        config.max_prefill_rows)
        try:
            yield
        finally:
            app.state.scheduler.close()

    app = FastAPI(title="lora-on-the-go", lifespan=lifespan, docs_url=None, redoc_url=None)
    page = (resources.files("logo.serve").joinpath("playground.html").read_text()
            .replace("__MAX_TOKENS__", str(min(PLAYGROUND_TOKENS, config.max_tokens_limit)))
            .replace("__MAX_TOKENS_LIMIT__", str(config.max_tokens_limit)))
    app.state.metrics = metrics
    app.state.tokenizer = copy.deepcopy(engine.tokenizer)  # the worker thread pads with the engine's own
    app.state.catalog = catalog

    # ------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.code, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:
            return error_response(400, f"the body is not valid JSON: {broken['ctx']['error']} at character "
                                  f"{broken['loc'][-1]}", code="invalid_json")
        # a key that is a lone surrogate (a value may hold one here: the prompt checks name it)
        key = next((e for e in errors if e.get("type") == "string_unicode"), None)
        if key is not None:
            where = ".".join(_field_path(key))
            return error_response(400, f"{where or 'the body'} has a key that is not valid Unicode "
                                  f"({ascii(key['input'])}, a lone surrogate); send keys as UTF-8 text",
                                  where or None, "invalid_key")
        # a value that fits no member of a union fails once per member: report the member it went furthest into
        worst = max(errors, key=lambda e: len(_field_path(e)))
        where = ".".join(_field_path(worst))
        if not where:
            kind = request.headers.get("content-type", "none")
            return error_response(400, f"the body must be a JSON object sent as application/json (Content-Type "
                                  f"was {kind}): {worst.get('msg')}", None, worst.get("type"))
        return error_response(400, f"{where}: {worst.get('msg')}", where, worst.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        bad = err.__cause__  # FastAPI's "There was an error parsing the body" hides why
        if isinstance(bad, UnicodeDecodeError):
            return error_response(400, f"the body is not valid UTF-8 (byte {bad.object[bad.start]:#04x} at offset "
                                  f"{bad.start}); send JSON encoded as UTF-8", code="invalid_utf8")
        return error_response(err.status_code, str(err.detail), code=str(err.status_code), headers=err.headers)

    @app.exception_handler(Exception)
    async def crash(_request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")

    app.add_middleware(Guard, api_key=config.api_key, metrics=metrics)

    # ---------------------------------------------------------- endpoints
    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health(request: Request) -> dict:
        scheduler = request.app.state.scheduler
        return {"status": "ok", "queue_depth": scheduler.queue_depth, "running": scheduler.running,
                "max_batch_size": config.max_batch_size, "max_queue": config.max_queue}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        cards = [ModelCard(id=config.routed_id, created=created, owned_by="logo (routed)"),
                 ModelCard(id=config.base_id, created=created, owned_by="base model")]
        cards += [ModelCard(id=name, created=created, owned_by="adapter") for name in catalog.adapters]
        return {"object": "list", "data": [c.model_dump() for c in cards]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        for card in (await models())["data"]:
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"unknown model {model_id!r}; GET /v1/models lists them", "model", "model_not_found")

    @app.get("/v1/adapters")
    async def adapters() -> dict:
        cards = [AdapterCard(name=name, rank=int(cfg.get("r", 0)), targets=sorted(_targets(cfg)))
                 for name, cfg in zip(engine.library.names, engine.library.configs)]
        return {"object": "list", "data": [c.model_dump() for c in cards]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        exchange = await _exchange(request, body, prompts, body.max_tokens, COMPLETION_DEFAULT_TOKENS, "prompt")
        model = body.model or config.routed_id
        if body.stream:
            return StreamingResponse(_stream_completion(exchange, model, _include_usage(body)),
                                     media_type="text/event-stream")
        texts = [""] * len(prompts)
        try:
            async for index, text, _reason in exchange.updates(request):
                texts[index] += text
        finally:
            exchange.cancel()
        if exchange.gone:
            return Response(status_code=CLIENT_GONE)
        multi = len(prompts) > 1
        choices = [CompletionChoice(index=i, text=t, finish_reason=exchange.reasons[i],
                                    logo=exchange.info[i] if multi else None) for i, t in enumerate(texts)]
        return Completion(id=exchange.id, created=exchange.created, model=model, choices=choices,
                          usage=exchange.usage(), logo=exchange.info[0]).model_dump(exclude_none=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        prompt = await run_in_threadpool(_chat_prompt, request.app.state.tokenizer, body)  # a template renders slowly
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        exchange = await _exchange(request, body, [prompt], max_tokens, CHAT_DEFAULT_TOKENS, "messages",
                             "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
                             ["messages (after the chat template)"])
        exchange.id = f"chatcmpl-{uuid.uuid4().hex}"
        model = body.model or config.routed_id
        if body.stream:
            return StreamingResponse(_stream_chat(exchange, model, _include_usage(body)),
                                     media_type="text/event-stream")
        text = ""
        try:
            async for _index, delta, _reason in exchange.updates(request):
                text += delta
        finally:
            exchange.cancel()
        if exchange.gone:
            return Response(status_code=CLIENT_GONE)
        choice = ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=exchange.reasons[0])
        return ChatCompletion(id=exchange.id, created=exchange.created, model=model, choices=[choice],
                              usage=exchange.usage(), logo=exchange.info[0]).model_dump()

    return app


async def _exchange(request: Request, body, prompts: list[str], max_tokens: int | None, default_tokens: int,
                    param: str, tokens_param: str = "max_tokens", names: list[str] | None = None) -> Exchange:
    """The request's checks, then its jobs queued. Tokenizing the prompts runs off the event loop (long prompts
    take seconds), so other requests' streams and ``/health`` go on meanwhile."""
    state = request.app.state
    catalog: Catalog = state.catalog
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options applies only to streamed requests; set stream to true or drop "
                       "stream_options", "stream_options")
    selection, router = choose_mixture(body.model, body.logo, catalog)
    settings = settings_for(max_tokens, default_tokens, body.temperature, body.top_p, body.seed, body.n, catalog,
                            tokens_param)
    stops = stop_strings(body.stop)
    check_logprobs(body.logprobs, getattr(body, "top_logprobs", None))
    lengths = await run_in_threadpool(prompt_lengths, state.tokenizer, prompts, catalog, param, names)
    settings = fit_context(settings, lengths, catalog, max_tokens is not None, tokens_param,
                           names or [f"{param} {i}" for i in range(len(prompts))])
    penalties = Penalties(presence=body.presence_penalty, frequency=body.frequency_penalty)
    return Exchange(prompts, lengths, settings, selection, router, stops, state, penalties)


def _field_path(error: dict) -> list[str]:
    """An error's location in the body, without pydantic's union member tags (``str``, ``list[TextPart]``)."""
    return [str(p) for p in error.get("loc", ())[1:] if not (isinstance(p, str) and ("[" in p or p in _TAGS))]


_TAGS = {"str", "int", "float", "bool"}


def _include_usage(body) -> bool:
    """Whether a streamed request asked for the final usage chunk (OpenAI sends it only then)."""
    return body.stream_options is not None and body.stream_options.include_usage


def _targets(config: dict) -> set[str]:
    targets = config.get("target_modules") or []
    return {targets} if isinstance(targets, str) else set(targets)


def _chat_prompt(tokenizer, body: ChatRequest) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = []
    for i, message in enumerate(body.messages):
        if message.content is None and message.role != "assistant":
            raise ApiError(400, f"messages.{i} ({message.role}) has no content; give some text (only an assistant "
                           "message may have null content)", "messages")
        content = message.content or ""
        content = content if isinstance(content, str) else "".join(p.text for p in content)
        if not content.strip() and message.role == "user":
            raise ApiError(400, f"messages.{i} (user) is empty; give some text", "messages")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ApiError(400, f"messages.{i} ({message.role}) content is not valid Unicode (a lone surrogate at "
                           f"character {err.start}); send UTF-8 text", "messages") from None
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:
        raise ApiError(400, f"this model's chat template refuses these messages: {err}", "messages") from None
    return without_added_bos(tokenizer, text)


def without_added_bos(tokenizer, text: str) -> str:
    """The templated ``text`` without its leading BOS token where tokenizing adds one anyway (Llama-3's template
    writes ``{{ bos_token }}`` and its tokenizer prepends BOS too): the prompt is tokenized like any other (with
    special tokens), so the model would otherwise see two BOS tokens and the usage count one token too many."""
    bos = tokenizer.bos_token
    if not bos or not text.startswith(bos):
        return text
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return text[len(bos):] if ids[:1] == [tokenizer.bos_token_id] else text


async def _stream(exchange: Exchange, chunks: AsyncIterator[str],
                  final: Callable[[], dict] | None) -> AsyncIterator[str]:
    """SSE lines: the chunks, then ``final()`` (the usage chunk) if given; an error chunk instead on failure;
    ``[DONE]``."""
    try:
        async for line in chunks:
            yield line
        if final is not None:
            yield sse(final())
    except ApiError as err:
        yield sse(ErrorBody(error=ErrorDetail(message=err.message, type=err.kind)).model_dump())
    finally:
        exchange.cancel()
    yield sse("[DONE]")


def _chunk_fields(payload: dict, usage: bool) -> dict:
    """A stream chunk's fields as OpenAI sends them: ``usage`` (null) only in a stream that asked for it."""
    if not usage:
        payload.pop("usage", None)
    return payload


def _stream_completion(exchange: Exchange, model: str, usage: bool) -> AsyncIterator[str]:
    def chunk(index: int, text: str, reason: str | None, info: LogoInfo | None = None) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=reason)
        return sse(_chunk_fields(Completion(id=exchange.id, created=exchange.created, model=model, choices=[choice],
                                            logo=info).model_dump(), usage))

    async def chunks() -> AsyncIterator[str]:
        async for index, text, reason in exchange.updates(None):
            first = exchange.info[index] is not None and not text and reason is None
            yield chunk(index, text, reason, exchange.info[index] if first else None)

    def final() -> dict:
        return Completion(id=exchange.id, created=exchange.created, model=model, choices=[],
                          usage=exchange.usage()).model_dump()

    return _stream(exchange, chunks(), final if usage else None)


def _stream_chat(exchange: Exchange, model: str, usage: bool) -> AsyncIterator[str]:
    def chunk(delta: Delta, reason: str | None = None, info: LogoInfo | None = None) -> str:
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=reason)
        payload = ChatChunk(id=exchange.id, created=exchange.created, model=model, choices=[choice],
                            logo=info).model_dump()
        payload["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # OpenAI's last delta is {}
        return sse(_chunk_fields(payload, usage))

    async def chunks() -> AsyncIterator[str]:
        async for _index, text, reason in exchange.updates(None):
            if not text and reason is None:
                yield chunk(Delta(role="assistant", content=""), info=exchange.info[0])
                continue
            if text:
                yield chunk(Delta(content=text))
            if reason is not None:
                yield chunk(Delta(), reason)

    def final() -> dict:
        return ChatChunk(id=exchange.id, created=exchange.created, model=model, choices=[],
                         usage=exchange.usage()).model_dump()

    return _stream(exchange, chunks(), final if usage else None)
