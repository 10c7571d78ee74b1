"""Continuous batching on one worker thread that owns the model.

Requests wait in a bounded queue. Between two decode steps the worker admits waiting requests (at most
``max_prefill_rows`` at a time, so a burst of arrivals does not stall the rows already decoding): it routes them
(a clean LoGo probe, or the fixed mixture they asked for), prefills them together under their own mixtures,
chooses their first tokens, and merges their KV-cache rows into the running batch (left-padded). Every decode
step then runs one forward pass for all rows, each row under its own mixture. A row that stops (end-of-sequence
token, its ``max_tokens``, or a cancel from a client that went away) leaves the batch at once. Only this thread
touches the engine.

The mixture follows the rows instead of being set afresh whenever they change (at paper scale, gathering every
row's factors again costs about half a decode step): newcomers are appended (``engine.add_mixture_rows``: only
their factors are gathered) and prefilled alone (``engine.mixture_rows_from``); a finished row's place is taken
by the last row of the batch (``engine.keep_mixture_rows``: one row moved per hole, see :func:`fill_holes`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.generation import GenerationSettings
from logo.models import cache_keyword
from logo.router import Route, RouterConfig, Selection
from logo.serve.batch_cache import BatchCache
from logo.serve.metrics import Metrics
from logo.serve.sampling import Penalties, RowSettings, choose, count

log = logging.getLogger("logo.serve")


class QueueFull(LogoError):
    """The server's queue is full; the client should retry later."""


class ShuttingDown(LogoError):
    """The server is shutting down and takes no more requests."""


@dataclass
class Event:
    """What the worker tells a request: ``routed`` (selected), ``token`` (token), ``done`` (reason: stop | length),
    ``error`` (message; reason: invalid | internal)."""

    kind: str
    token: int = 0
    selected: list[dict] = field(default_factory=list)
    abstained: bool = False
    """``routed``: the router sent the prompt to the base model (``selected`` is empty)."""
    reason: str = ""
    message: str = ""


@dataclass
class Job:
    """One prompt to continue. ``selection`` fixes the mixture (empty = the base model); otherwise LoGo routes
    it with ``router`` (None: the server's router)."""

    prompt: str
    settings: GenerationSettings
    selection: Selection | None = None
    router: RouterConfig | None = None
    penalties: Penalties = field(default_factory=Penalties)
    cancelled: bool = False
    """Set by the front end (client gone, stop string seen); the worker drops the row at its next step."""
    on_event: Callable[[Event], None] = lambda event: None
    """Called by the worker thread (through :class:`Scheduler`'s ``deliver``)."""


@dataclass
class _Row:
    job: Job
    selection: Selection


Deliver = Callable[[list[tuple[Job, Event]]], None]


def deliver_directly(events: list[tuple[Job, Event]]) -> None:
    """Call each job's ``on_event`` on the worker thread (tests, or front ends that are thread-safe)."""
    for job, event in events:
        job.on_event(event)


class Scheduler:
    """The batching loop. :meth:`submit` from any thread; events come back through ``deliver``, once per
    admission or step with every job's events of that moment (so a front end can hand them over in one go)."""

    def __init__(self, engine: LoGoEngine, max_batch_size: int = 32, max_queue: int = 256,
                 deliver: Deliver = deliver_directly, metrics: Metrics | None = None,
                 max_prefill_rows: int = 8) -> None:
        if max_batch_size < 1:
            raise LogoError(f"--max-batch-size must be at least 1, got {max_batch_size}")
        if max_prefill_rows < 1:
            raise LogoError(f"--max-prefill-rows must be at least 1, got {max_prefill_rows}")
        self.max_prefill_rows = max_prefill_rows
        if max_queue < 1:
            raise LogoError(f"--max-queue must be at least 1, got {max_queue}")
        if engine.decoder is not None:
            raise LogoError("the server batches with its own dynamic KV cache; build its engine with decode='eager'")
        self.engine, self.model = engine, engine.model
        self._cache_kw = cache_keyword(engine.model)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.deliver, self.metrics = deliver, metrics or Metrics()
        self.stops = torch.tensor(sorted(set(engine.stop_ids(False))), dtype=torch.long, device=engine.device)
        self._engines: dict[str, LoGoEngine] = {repr(engine.router.config): engine}
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._reset()
        self._thread = threading.Thread(target=self._loop, name="logo-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ front
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); :class:`QueueFull` when they do not fit in the queue, :class:`ShuttingDown`
        after :meth:`close`."""
        with self._wake:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            self._purge()
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests, --max-queue); retry shortly")
            self._waiting.extend(jobs)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        """Waiting jobs whose client still waits (cancelled ones leave the queue here)."""
        with self._wake:
            self._purge()
            return len(self._waiting)

    def _purge(self) -> None:
        """Drop the cancelled jobs from the queue (the caller holds the lock)."""
        if any(job.cancelled for job in self._waiting):
            self._waiting = deque(job for job in self._waiting if not job.cancelled)
            self.metrics.queue_depth.set(len(self._waiting))

    @property
    def running(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ loop
    def _reset(self) -> None:
        self._rows: list[_Row] = []
        self._batch: BatchCache | None = None
        self._stale = True  # the mixture no longer matches the rows
        device = self.engine.device
        self._last = torch.zeros(0, dtype=torch.long, device=device)  # each row's newest token (not yet cached)
        self._positions = torch.zeros(0, dtype=torch.long, device=device)  # its position id
        self._steps = torch.zeros(0, dtype=torch.long, device=device)  # tokens generated so far
        self._limits = torch.zeros(0, dtype=torch.long, device=device)  # max_tokens
        self._settings: RowSettings | None = None
        self._counts: torch.Tensor | None = None
        """``[B, V]``: the times each row has generated each token; kept only while some row has a penalty."""

    def _take(self) -> list[Job]:
        with self._wake:
            while not self._waiting and not self._rows and not self._closing:
                self._wake.wait()
            free = min(self.max_batch_size - len(self._rows), self.max_prefill_rows)
            taken = []
            while self._waiting and len(taken) < free:
                job = self._waiting.popleft()
                if not job.cancelled:
                    taken.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            return taken

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closing:
            jobs = self._take()
            if self._closing:
                break
            if jobs:
                self._admit_safely(jobs)
            if self._rows:
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001 - the loop must survive; every running row is told
                    log.exception("decode step failed")
                    self._fail([row.job for row in self._rows], f"the decode step failed: {err}")
                    self._reset()
            self.metrics.running.set(len(self._rows))

    def _admit_safely(self, jobs: list[Job], routed: set[int] | None = None) -> None:
        """Admit jobs together; if that fails, one by one, so only the request at fault gets the error.
        ``routed``: the ids of the jobs already told their ``routed`` event (each is told once)."""
        routed = set() if routed is None else routed
        try:
            self._admit(jobs, routed)
            return
        except Exception as err:  # noqa: BLE001 - a bad request must not stop the loop
            if len(jobs) == 1:
                log.warning("request failed: %s", err)
                if isinstance(err, LogoError):
                    self._fail(jobs, str(err), invalid=True)
                else:
                    self._fail(jobs, f"internal error: {type(err).__name__}: {err}")
                return
            # said, not hidden: one request at fault is expected here, anything else is a server bug to see
            log.warning("admitting %d requests together failed (%s: %s); admitting them one by one", len(jobs),
                        type(err).__name__, err)
        for job in jobs:
            self._admit_safely([job], routed)

    def _fail(self, jobs: list[Job], message: str, invalid: bool = False) -> None:
        """Tell ``jobs`` they failed; ``invalid``: the request was at fault (a 400), else the server (a 500)."""
        reason = "invalid" if invalid else "internal"
        self.deliver([(job, Event("error", message=message, reason=reason)) for job in jobs])

    # ------------------------------------------------------------- admission
    def _admit(self, jobs: list[Job], routed: set[int]) -> None:
        engine = self.engine
        ids, mask = engine.encode([job.prompt for job in jobs])
        start = time.perf_counter()
        selections = self._select(jobs, ids, mask)  # the probe runs with the running rows' mixture suspended
        self.metrics.route_seconds.observe(time.perf_counter() - start)
        told = [(job, sel) for job, sel in zip(jobs, selections) if id(job) not in routed]  # each job once
        for _job, sel in told:
            if isinstance(sel, Route):
                self.metrics.count_selection(sel.names)
        self.deliver([(job, Event("routed", selected=self._describe(sel),
                                  abstained=isinstance(sel, Route) and sel.abstained)) for job, sel in told])
        routed.update(id(job) for job in jobs)
        first = len(self._rows)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache()
        if self._stale:
            engine.set_mixture([row.selection for row in self._rows] + selections)
        else:
            engine.add_mixture_rows(selections)
        self._stale = True  # until the newcomers are in: a failure leaves rows in the mixture that are not admitted
        with engine.mixture_rows_from(first):  # the newcomers' prefill, under their own mixtures only
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self._cache_kw: cache},
                                use_cache=True, logits_to_keep=1).logits[:, -1, :]
        settings = _row_settings(jobs, engine.device)
        steps = torch.zeros(len(jobs), dtype=torch.long, device=engine.device)
        tokens = choose(logits, settings, steps)  # nothing generated yet: no penalty applies

        new = BatchCache(cache, mask)
        self._batch = new if self._batch is None else self._batch.merged(new)
        self._rows += [_Row(job, sel) for job, sel in zip(jobs, selections)]
        self._settings = settings if self._settings is None else RowSettings.cat([self._settings, settings])
        self._count_newcomers(tokens, logits.shape[-1])
        self._positions = torch.cat([self._positions, positions[:, -1]])
        self._steps = torch.cat([self._steps, steps + 1])
        self._limits = torch.cat([self._limits, torch.tensor([job.settings.max_new_tokens for job in jobs],
                                                             device=engine.device)])
        self._last = torch.cat([self._last, tokens])
        self._stale = False
        self._after(first)

    def _select(self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor) -> list[Selection]:
        """Each job's mixture: fixed, or LoGo routes it (jobs that share a router config share one probe). A prompt's
        scores in a (left-padded) batch equal its scores alone only to float rounding (about 1e-6 relative): the
        batch's matmuls round differently, padded or not, while the attention masks the padding exactly."""
        selections: list[Selection | None] = [job.selection for job in jobs]
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            if job.selection is None:
                groups.setdefault(repr(job.router or self.engine.router.config), []).append(i)
        for key, members in groups.items():
            router_engine = self._router_engine(key, jobs[members[0]].router)
            picked = torch.tensor(members, device=ids.device)
            for i, route in zip(members, router_engine.route_batch(ids[picked], mask[picked])):
                selections[i] = route
        return selections  # type: ignore[return-value]

    def _router_engine(self, key: str, config: RouterConfig | None) -> LoGoEngine:
        if key not in self._engines:
            self._engines[key] = self.engine.with_router(config)
        return self._engines[key]

    def _describe(self, selection: Selection) -> list[dict]:
        """``[{"name", "weight", "score"}]`` of a mixture (score None where the client fixed the mixture)."""
        names = self.engine.library.names
        scores = selection.scores if isinstance(selection, Route) else [None] * len(selection.indices)
        return [{"name": names[i], "weight": w, "score": s}
                for i, w, s in zip(selection.indices, selection.weights, scores)]

    # ----------------------------------------------------------------- decode
    def _step(self) -> None:
        if self._stale:
            self.engine.set_mixture([row.selection for row in self._rows])
            self._stale = False
        mask = self._batch.extended()
        self._positions = self._positions + 1
        logits = self.model(input_ids=self._last[:, None], attention_mask=mask, position_ids=self._positions[:, None],
                            **{self._cache_kw: self._batch.cache}, use_cache=True).logits[:, -1, :]
        self.metrics.batch_size.observe(len(self._rows))
        self._last = choose(logits, self._settings, self._steps, self._counts)
        if self._counts is not None:
            count(self._counts, self._last)
        self._steps = self._steps + 1
        self._after(0)

    def _count_newcomers(self, tokens: torch.Tensor, vocab: int) -> None:
        """Start counting the newcomers' tokens (their first ones, ``tokens``) once some row has a penalty; rows
        admitted before that have none, so their missing counts change nothing."""
        if self._counts is None and not self._settings.penalized:
            return
        rows, device = len(self._rows), self._last.device
        if self._counts is None:
            self._counts = torch.zeros(rows, vocab, dtype=torch.int32, device=device)
        else:
            fresh = torch.zeros(len(tokens), vocab, dtype=torch.int32, device=device)
            self._counts = torch.cat([self._counts, fresh])
        count(self._counts[rows - len(tokens):], tokens)

    def _after(self, first: int) -> None:
        """Hand rows ``first:`` their newest token (or their end), then drop every row that is done."""
        tokens = self._last[first:]
        stopped = torch.isin(tokens, self.stops)
        full = self._steps[first:] >= self._limits[first:]
        cancelled = torch.tensor([row.job.cancelled for row in self._rows[first:]], device=tokens.device)
        done = stopped | full | cancelled
        events: list[tuple[Job, Event]] = []
        for row, token, stop, end, gone in zip(self._rows[first:], tokens.tolist(), stopped.tolist(),
                                               full.tolist(), cancelled.tolist()):
            if gone:
                continue
            if not stop:
                events.append((row.job, Event("token", token=token)))
            if stop or end:
                events.append((row.job, Event("done", reason="stop" if stop else "length")))
        generated = int((~stopped & ~cancelled).sum())
        self.metrics.completion_tokens.inc(generated)
        self.deliver(events)
        if bool(done.any()):
            self._drop(fill_holes(torch.cat([torch.zeros(first, dtype=torch.bool, device=done.device), done])))

    def _drop(self, keep: torch.Tensor) -> None:
        if keep.numel() == 0:
            self._reset()
            self.engine.clear_mixture()
            return
        self._batch = self._batch.selected(keep)
        self._rows = [self._rows[i] for i in keep.tolist()]
        self._settings = self._settings.select(keep)
        if self._counts is not None:
            self._counts = self._counts[keep] if self._settings.penalized else None
        self._positions, self._steps = self._positions[keep], self._steps[keep]
        self._limits, self._last = self._limits[keep], self._last[keep]
        if not self._stale:
            self.engine.keep_mixture_rows(keep)


def fill_holes(done: torch.Tensor) -> torch.Tensor:
    """The rows to keep, in their new order, when rows ``done`` (a bool per row) leave: each hole below the new batch
    size takes one of the rows beyond it, and every other row stays where it is (so the mixture moves one row per
    hole). E.g. done at 1 and 3 of 6 rows: ``[0, 4, 2, 5]``."""
    kept = (~done).nonzero()[:, 0]
    size = kept.numel()
    order = torch.arange(size, device=done.device)
    holes = done[:size].nonzero()[:, 0]
    order[holes] = kept[kept >= size]  # as many rows beyond the new size as holes below it
    return order


def _row_settings(jobs: list[Job], device: torch.device) -> RowSettings:
    """Tensors of the jobs' sampling settings; a job without a seed gets a random one."""
    settings = [job.settings for job in jobs]
    return RowSettings(
        greedy=torch.tensor([not s.do_sample for s in settings], device=device),
        temperature=torch.tensor([s.temperature for s in settings], dtype=torch.float32, device=device),
        top_p=torch.tensor([s.top_p for s in settings], dtype=torch.float32, device=device),
        seed=torch.tensor([secrets.randbits(63) if s.seed is None else s.seed for s in settings],
                          dtype=torch.long, device=device),
        presence=torch.tensor([job.penalties.presence for job in jobs], dtype=torch.float32, device=device),
        frequency=torch.tensor([job.penalties.frequency for job in jobs], dtype=torch.float32, device=device),
    )
