"""`logo serve --replicas N`: the same HTTP API from N Ray Serve replicas, each holding its own engine.

Every replica builds the engine from one :class:`~logo.spec.EngineSpec` and runs the very app of
:func:`logo.serve.api.create_app` (its scheduler batches the requests that reach it, continuously, as a single
server does); Ray Serve's HTTP proxy spreads requests over the replicas and keeps the API, streaming included.
``--min-replicas``/``--max-replicas`` let Ray Serve scale between the two by ongoing requests instead.
``/metrics`` is answered by whichever replica the proxy picks, so it reports that replica's counters.
"""

from __future__ import annotations

import signal
import sys

import torch

from logo.cli_core import build_checked
from logo.errors import LogoError
from logo.serve.api import ServeConfig, create_app
from logo.spec import EngineSpec

try:
    import ray
    from ray import serve
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise LogoError('logo serve --replicas needs Ray Serve: pip install "lora-on-the-go[ray]"') from err

TARGET_ONGOING_REQUESTS = 16
"""Autoscaling target per replica: about half a full batch (``--max-batch-size`` 32) in flight."""


def replica_app(spec: EngineSpec, config: ServeConfig, threads: int):
    """The app one replica serves: its engine, calibration statistics checked as `logo serve` checks them (a router
    that would answer every request 400 fails the replica instead), the decode kernel built, under the server app."""
    torch.set_num_threads(max(1, threads))
    engine = build_checked(spec, progress=False)
    engine.prepare_decode()  # the kernel is built (once per machine) before the replica takes requests
    return create_app(engine, config)


@serve.deployment
@serve.ingress()
class LogoReplica:
    """One replica: an engine and the server app (with its own batching scheduler) on top of it."""

    def __init__(self, spec: EngineSpec, config: ServeConfig, threads: int) -> None:
        self.server = replica_app(spec, config, threads)

    def __serve_build_asgi_app__(self):
        return self.server


def replica_options(replicas: int, min_replicas: int | None, max_replicas: int | None, threads: int) -> dict:
    """Ray Serve deployment options: a fixed count (``--replicas``), or autoscaling between ``--min-replicas``
    (default 1; 0 lets Ray Serve scale to zero) and ``--max-replicas`` (default: the minimum, at least 1)."""
    actor = {"ray_actor_options": {"num_cpus": threads}, "max_ongoing_requests": 1024}
    if min_replicas is None and max_replicas is None:
        if replicas < 1:
            raise LogoError(f"--replicas must be at least 1, got {replicas}")
        return {**actor, "num_replicas": replicas}
    if replicas:
        raise LogoError("give either --replicas N (a fixed count) or --min-replicas/--max-replicas (autoscaling), "
                        "not both")
    low = 1 if min_replicas is None else min_replicas
    high = max(low, 1) if max_replicas is None else max_replicas
    if low < 0:
        raise LogoError(f"--min-replicas must be at least 0, got {low}")
    if high < 1:
        raise LogoError(f"--max-replicas must be at least 1, got {high}")
    if low > high:
        raise LogoError(f"--min-replicas ({low}) must not exceed --max-replicas ({high})")
    return {**actor, "autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                            "target_ongoing_requests": TARGET_ONGOING_REQUESTS}}


def run_replicas(spec: EngineSpec, config: ServeConfig, host: str, port: int, options: dict, threads: int,
                 address: str = "", blocking: bool = True) -> None:
    """Start (or join) Ray, then serve the app from the replicas on ``host:port``. Blocking, it runs until it is
    interrupted or terminated (SIGTERM), then shuts Ray Serve down and leaves Ray."""
    if not ray.is_initialized():
        ray.init(address=None if address in ("", "local") else address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    deployment = LogoReplica.options(**options).bind(spec, config, threads)
    if not blocking:
        serve.run(deployment, name="logo", route_prefix="/", blocking=False)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so a terminated server still shuts its replicas down
    try:
        serve.run(deployment, name="logo", route_prefix="/", blocking=True)
    except RuntimeError as err:  # Ray Serve's "Deploying application logo failed": no replica could start
        raise LogoError(f"Ray Serve could not start the replicas ({str(err).splitlines()[0].rstrip('.')}); the "
                        "replicas' own error (e.g. missing calibration statistics) is in Ray's log above") from None
    finally:
        serve.shutdown()
        ray.shutdown()
