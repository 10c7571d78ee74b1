"""Prometheus metrics of one server (own registry, so several servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Requests, tokens, queue depth, rows per decode step, route latency, selections per adapter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("logo_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("logo_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("logo_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("logo_queue_depth", "Requests waiting to join the batch", registry=r)
        self.running = Gauge("logo_running_rows", "Rows in the running batch", registry=r)
        self.batch_size = Histogram("logo_batch_size", "Rows per decode step", buckets=BATCH_BUCKETS, registry=r)
        self.route_seconds = Histogram("logo_route_seconds", "Seconds to route one admitted group (probe, score, "
                                       "select)", buckets=SECONDS_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("logo_time_to_first_token_seconds", "Seconds from request to first token",
                                      buckets=SECONDS_BUCKETS, registry=r)
        self.selections = Counter("logo_adapter_selections", "Times LoGo selected each adapter", ["adapter"],
                                  registry=r)

    def count_selection(self, names: list[str]) -> None:
        for name in names:
            self.selections.labels(adapter=name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
