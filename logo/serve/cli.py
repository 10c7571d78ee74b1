"""`logo serve` (the OpenAI-compatible server) and `logo loadtest` (a bounded load test against it)."""

from __future__ import annotations

import errno
import socket
from typing import Annotated

import typer

from logo.cli_options import (
    Abstain,
    AbstainBelow,
    Adapters,
    BaseModel,
    Calibration,
    Device,
    Dtype,
    K,
    Layer,
    Module,
    Position,
    PostNorm,
    Router,
    Strategy,
    Weighting,
    WeightTemp,
)
from logo.errors import LogoError
from logo.generation import MAX_PROMPT_TOKENS

SERVE_DECODE = ("eager",)
"""The server decodes with its own continuous-batching loop on a dynamic KV cache (``logo.serve.scheduler``);
the engine's static/compiled paths fix the batch for a whole generation, so they do not fit it yet."""
ServeDecode = Annotated[str, typer.Option("--decode", help="eager: the server batches requests continuously on a "
                                          "dynamic KV cache (the static and compiled paths of `logo generate` fix "
                                          "the batch for a whole generation).")]


def serve(
    base_model: BaseModel = "smollm2-135m",
    adapters: Adapters = None,
    router: Router = "auto",
    selection_strategy: Strategy = None,
    n_selected_modules: K = None,
    signal_layer: Layer = None,
    signal_module: Module = None,
    post_norm: PostNorm = None,
    position: Position = None,
    weighting: Weighting = None,
    weight_temperature: WeightTemp = None,
    calibration: Calibration = None,
    abstain: Abstain = None,
    abstain_below: AbstainBelow = None,
    device: Device = None,
    dtype: Dtype = "auto",
    decode: ServeDecode = "eager",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port; the URL printed "
                                                         "names it).")] = 8000,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Rows decoded together at most.")] = 32,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Waiting requests at most; then 429.")] = 256,
    max_prefill_rows: Annotated[int, typer.Option("--max-prefill-rows", help="New requests prefilled together at "
                                                  "most, between two decode steps.")] = 8,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", help="Longest prompt, in tokens.")] = (
        MAX_PROMPT_TOKENS),
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may "
                                                  "ask for.")] = 512,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LOGO_API_KEY", help="Require 'Authorization: "
                                                "Bearer KEY' on /v1/* (default: $LOGO_API_KEY, else open).")] = None,
    model_id: Annotated[str, typer.Option("--model-id", help="The model id clients send to have LoGo route.")] = (
        "logo"),
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for the model (torch's default: "
                                                "one per core; 1 can be faster on a busy, shared machine).")] = None,
    replicas: Annotated[int, typer.Option("--replicas", help="Serve from N Ray Serve replicas, each with its own "
                                          "engine (0: one process, no Ray).")] = 0,
    min_replicas: Annotated[int | None, typer.Option("--min-replicas", help="With Ray Serve: autoscale from this "
                                                     "many replicas (default 1; 0 scales to zero)...")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max-replicas", help="...up to this many (default: "
                                                     "--min-replicas, at least 1). Not with --replicas.")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With replicas: 'local' (the default) "
                                                    "starts a local Ray, HOST:PORT joins a cluster.")] = None,
) -> None:
    """Serve an OpenAI-compatible API that routes every request with LoGo, batches requests and streams."""
    import torch  # lazy (as uvicorn): keeps `logo --help` fast

    from logo.cli_core import build_checked, engine_spec
    from logo.router import router_overrides
    from logo.serve.api import ServeConfig, create_app

    if decode not in SERVE_DECODE:
        raise LogoError(f"--decode {decode} is not supported by logo serve: it batches requests continuously on a "
                        f"dynamic KV cache; use --decode eager")
    check_port(port)
    replicated = replicas != 0 or min_replicas is not None or max_replicas is not None
    if ray_address is not None and not replicated:
        raise LogoError("--ray-address says where Ray runs the replicas: add --replicas N (or --min-replicas/"
                        "--max-replicas), or leave --ray-address out to serve from this process")
    if threads is not None:
        if threads < 1:
            raise LogoError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    # The router: the library's fitted router file (or --router's), the router flags over it, as `logo generate`.
    overrides = router_overrides(selection_strategy, n_selected_modules, signal_layer, signal_module, post_norm,
                                 position, weighting, weight_temperature, calibration, abstain, abstain_below)
    spec = engine_spec(base_model, adapters, overrides, router, device, dtype, decode)
    config = ServeConfig(base_id=base_model, routed_id=model_id, max_batch_size=max_batch_size, max_queue=max_queue,
                         max_prefill_rows=max_prefill_rows,
                         max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit, api_key=api_key)
    if replicated:
        serve_replicas(spec, config, host, port, replicas, min_replicas, max_replicas, threads or 1,
                       ray_address or "local")
        return
    sock = listening_socket(host, port)  # before the model loads: a port in use fails in a line, at once
    try:
        engine = build_checked(spec)
        print(f"logo serve: {engine.prepare_decode()}", flush=True)
        app = create_app(engine, config)
        print(f"logo serve: {len(engine.library)} adapters, k={engine.router.config.k}; "
              f"{server_url(host, sock.getsockname()[1])}/ (playground), /v1/completions, /v1/chat/completions",
              flush=True)
        run_server(app, sock)
    finally:
        sock.close()


def serve_replicas(spec, config, host: str, port: int, replicas: int, min_replicas: int | None,
                   max_replicas: int | None, threads: int, ray_address: str) -> None:
    """`logo serve` from Ray Serve replicas: the replica flags, the adapters and the router (``spec.resolved``) and,
    with a local Ray, the port are checked here, before Ray starts; then Ray Serve runs until interrupted."""
    from logo.serve.replicas import replica_options, run_replicas  # lazy: Ray is an optional extra

    options = replica_options(replicas, min_replicas, max_replicas, threads)
    if port == 0:
        raise LogoError("--port 0 (any free port) works only without replicas: give Ray Serve's proxy a port, "
                        "e.g. --port 8000")
    spec.resolved()  # what each replica checks before it loads the model, checked once here
    if ray_address == "local":
        listening_socket(host, port).close()  # the proxy binds it on this machine: is it free?
    print(f"logo serve: Ray Serve replicas ({options.get('num_replicas') or options['autoscaling_config']}) on "
          f"{server_url(host, port)}/ (playground), /v1/completions, /v1/chat/completions", flush=True)
    run_replicas(spec, config, host, port, options, threads, ray_address)


def check_port(port: int) -> None:
    """``--port`` is a TCP port (0: any free one); checked before anything loads."""
    if not 0 <= port <= 65535:
        raise LogoError(f"--port must be between 0 and 65535 (0: any free port), got {port}")


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (IPv6 when ``host`` has a colon, as uvicorn binds), made before the
    model loads so that a port in use, or an address this machine does not have, is a one-line error at once; it
    listens at once too, so a second server cannot take the port while this one loads (clients wait meanwhile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait on TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as err:
        sock.close()
        hint = ("another server listens there: stop it or give another --port" if err.errno == errno.EADDRINUSE
                else "give --host an address of this machine (e.g. 127.0.0.1) and a --port you may use")
        raise LogoError(f"cannot listen on --host {host} --port {port} ({err.strerror or err}); {hint}") from None
    return sock


def server_url(host: str, port: int) -> str:
    """The server's root URL (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(app, sock: socket.socket) -> None:
    """Serve ``app`` with uvicorn on the bound ``sock`` until Ctrl-C or SIGTERM (as ``uvicorn.run``, which binds
    its own socket only after the model has loaded)."""
    import uvicorn  # lazy: keeps `logo --help` free of the server stack

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped (uvicorn.run passes it too)
        pass


def loadtest(
    url: Annotated[str, typer.Option("--url", help="The server (loopback only).")] = "http://127.0.0.1:8000",
    concurrency: Annotated[str, typer.Option("--concurrency", help="Comma-separated client counts.")] = "1,8,32",
    requests: Annotated[int, typer.Option("--requests-per-client", help="Requests each client sends, one after "
                                          "the other (a level sends clients x this many).")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens of every request.")] = 32,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds in which a level starts requests; "
                                              "requests still running then get 30 s more, then count as lost "
                                              "(as does one whose server is silent this long).")] = 120.0,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LOGO_API_KEY")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per level.")] = False,
) -> None:
    """Send a bounded number of streamed completions to a loopback server at several concurrency levels."""
    from logo.serve.loadtest import parse_levels, run_levels

    run_levels(url, parse_levels(concurrency), requests, max_tokens, time_limit, api_key, json_out)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(loadtest)
