"""`logo serve` and `logo loadtest` flags: bad input fails in a line before the model loads or Ray starts, the
calibration statistics are checked at startup, and the load test's report stays valid JSON. No server runs here
(the servers are driven end to end in test_serve.py, test_serve_embedded.py and test_serve_replicas.py)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from logo.errors import LogoError
from tests.serve_helpers import free_port


@pytest.fixture(scope="module")
def model_and_lib(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.helpers import MIXED_SPECS, make_library

    model_dir = tiny_model_dir("llama")
    lib = tmp_path_factory.mktemp("serve_cli_lib")
    make_library(AutoModelForCausalLM.from_pretrained(model_dir), lib, MIXED_SPECS[:4])
    return str(model_dir), str(lib)


@pytest.fixture
def no_server(monkeypatch):
    """Any attempt to start uvicorn fails the test (instead of serving forever)."""
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(uvicorn.Server, "run", started)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    from logo.spec import EngineSpec

    def build(spec, progress=False):
        raise AssertionError("the model loads")

    monkeypatch.setattr(EngineSpec, "build", build)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ calibration statistics at startup
def test_serve_checks_calibration_statistics_at_startup(model_and_lib, no_server):
    """A router whose statistics are missing would answer every request 400: `logo serve` refuses to start, as
    `logo generate` does, and gives its port back."""
    from logo.serve.cli import serve

    model_dir, lib = model_and_lib
    port = free_port()
    with pytest.raises(LogoError, match="no 'zscore' calibration statistics"):
        serve(base_model=model_dir, adapters=lib, calibration="zscore", weighting="softmax", device="cpu",
              port=port)
    assert port_is_free(port)


def test_a_replica_checks_calibration_statistics(model_and_lib):
    pytest.importorskip("ray.serve")
    import torch

    from logo.cli_core import engine_spec
    from logo.serve.api import ServeConfig
    from logo.serve.replicas import replica_app

    model_dir, lib = model_and_lib
    spec = engine_spec(model_dir, lib, {"calibration": "zscore", "weighting": "softmax"}, "auto", "cpu", "auto")
    with pytest.raises(LogoError, match="no 'zscore' calibration statistics"):
        replica_app(spec, ServeConfig(base_id=model_dir), torch.get_num_threads())


# ------------------------------------------------------------------ --port
@pytest.mark.parametrize("port", [70000, -1])
def test_a_port_out_of_range_fails_before_the_model_loads(model_and_lib, no_model, no_server, port):
    from logo.serve.cli import serve

    model_dir, lib = model_and_lib
    with pytest.raises(LogoError, match=f"--port must be between 0 and 65535 .*got {port}"):
        serve(base_model=model_dir, adapters=lib, port=port)


def test_a_port_in_use_fails_before_the_model_loads(model_and_lib, no_model, no_server):
    from logo.serve.cli import serve

    model_dir, lib = model_and_lib
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LogoError, match=f"--port {port} .*another server listens there"):
            serve(base_model=model_dir, adapters=lib, port=port)


def test_uvicorn_serves_on_the_socket_bound_before_the_model_loaded(model_and_lib, monkeypatch, capsys):
    """--port 0 takes a free port; the URL printed is the port uvicorn is handed, already listening."""
    from logo.serve import cli

    handed = []

    def run_server(app, sock):
        handed.append(sock.getsockname()[1])
        with socket.create_connection(("127.0.0.1", handed[0]), timeout=5):
            pass  # it listens: a client connects (and waits) while the server starts

    monkeypatch.setattr(cli, "run_server", run_server)
    model_dir, lib = model_and_lib
    cli.serve(base_model=model_dir, adapters=lib, device="cpu", port=0)
    assert handed[0] > 0 and f"http://127.0.0.1:{handed[0]}/ (playground)" in capsys.readouterr().out
    assert port_is_free(handed[0])


# ------------------------------------------------------------------ replicas: checked before Ray starts
@pytest.fixture
def no_ray(monkeypatch):
    """``run_replicas`` (which starts Ray) fails the test; the flags must fail before it."""
    pytest.importorskip("ray.serve")
    from logo.serve import replicas

    def run_replicas(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(replicas, "run_replicas", run_replicas)


@pytest.mark.parametrize(("flags", "message"), [
    ({"adapters": "missing"}, "missing"),
    ({"abstain": "margin"}, "--abstain margin needs its threshold"),
    ({"n_selected_modules": 9}, "9"),
    ({"min_replicas": 1}, "give either --replicas N .* or --min-replicas/--max-replicas"),
    ({"port": 0}, "--port 0"),
    ({"port": 70000}, "--port must be between 0 and 65535"),
])
def test_replica_flags_and_library_fail_before_ray_starts(model_and_lib, no_ray, no_model, tmp_path, flags,
                                                          message):
    from logo.serve.cli import serve

    model_dir, lib = model_and_lib
    if flags.get("adapters") == "missing":
        flags = {**flags, "adapters": str(tmp_path / "missing")}
    kwargs = {"base_model": model_dir, "adapters": lib, "replicas": 2, "port": free_port(), **flags}
    with pytest.raises(LogoError, match=message):
        serve(**kwargs)


def test_replicas_on_a_port_in_use_fail_before_ray_starts(model_and_lib, no_ray, no_model):
    from logo.serve.cli import serve

    model_dir, lib = model_and_lib
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(LogoError, match="another server listens there"):
            serve(base_model=model_dir, adapters=lib, replicas=2, port=taken.getsockname()[1])


def test_good_replica_flags_reach_ray(model_and_lib, monkeypatch, no_model):
    pytest.importorskip("ray.serve")
    from logo.serve import replicas
    from logo.serve.cli import serve

    calls = []
    monkeypatch.setattr(replicas, "run_replicas", lambda *args: calls.append(args))
    model_dir, lib = model_and_lib
    port = free_port()
    serve(base_model=model_dir, adapters=lib, min_replicas=0, max_replicas=3, port=port, ray_address="HEAD:6379")
    _spec, _config, host, got_port, options, threads, address = calls[0]
    assert (host, got_port, threads, address) == ("127.0.0.1", port, 1, "HEAD:6379")
    assert options["autoscaling_config"]["min_replicas"] == 0 and options["autoscaling_config"]["max_replicas"] == 3


def test_ray_address_without_replicas_is_an_error(model_and_lib, no_model, no_server):
    from logo.serve.cli import serve

    model_dir, lib = model_and_lib
    with pytest.raises(LogoError, match="--ray-address .*add --replicas N"):
        serve(base_model=model_dir, adapters=lib, ray_address="HEAD:6379", port=free_port())


@pytest.mark.parametrize(("replicas", "low", "high", "expected"), [
    (3, None, None, {"num_replicas": 3}),
    (0, 0, None, {"min_replicas": 0, "max_replicas": 1}),
    (0, 0, 2, {"min_replicas": 0, "max_replicas": 2}),
    (0, None, 4, {"min_replicas": 1, "max_replicas": 4}),
    (0, 2, None, {"min_replicas": 2, "max_replicas": 2}),
    (0, 2, 2, {"min_replicas": 2, "max_replicas": 2}),
])
def test_replica_options(replicas, low, high, expected):
    pytest.importorskip("ray.serve")
    from logo.serve.replicas import replica_options

    options = replica_options(replicas, low, high, 1)
    got = {"num_replicas": options["num_replicas"]} if "num_replicas" in options else {
        k: options["autoscaling_config"][k] for k in ("min_replicas", "max_replicas")}
    assert got == expected


@pytest.mark.parametrize(("replicas", "low", "high", "message"), [
    (0, None, 0, "--max-replicas must be at least 1, got 0"),
    (0, 0, 0, "--max-replicas must be at least 1, got 0"),
    (0, -1, 2, "--min-replicas must be at least 0, got -1"),
    (0, 3, 2, r"--min-replicas \(3\) must not exceed --max-replicas \(2\)"),
    (5, 1, 2, "give either --replicas N"),
    (5, None, 2, "give either --replicas N"),
    (-1, None, None, "--replicas must be at least 1, got -1"),
])
def test_bad_replica_options(replicas, low, high, message):
    pytest.importorskip("ray.serve")
    from logo.serve.replicas import replica_options

    with pytest.raises(LogoError, match=message):
        replica_options(replicas, low, high, 1)


# ------------------------------------------------------------------ loadtest
@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "ftp://127.0.0.1:8000", ""])
def test_loadtest_url_needs_a_scheme(url):
    from logo.serve.loadtest import check_loopback

    with pytest.raises(LogoError, match="give a URL with a scheme, e.g. http://127.0.0.1:8000"):
        check_loopback(url)


def test_loadtest_url_is_loopback():
    from logo.serve.loadtest import check_loopback

    assert check_loopback("http://localhost:8000/") == "http://localhost:8000"
    assert check_loopback("http://[::1]:8000") == "http://[::1]:8000"
    with pytest.raises(LogoError, match="only to loopback .*not 'example.com'"):
        check_loopback("http://example.com:8000")


def test_loadtest_keeps_the_message_of_an_error_in_the_stream():
    import asyncio

    from logo.serve.loadtest import _one

    def handler(request: httpx.Request) -> httpx.Response:
        error = {"error": {"message": "the worker stopped", "type": "server_error", "param": None, "code": None}}
        return httpx.Response(200, text=f"data: {json.dumps(error)}\n\n", headers={"content-type": "text/event-stream"})

    async def one():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await _one(client, "http://127.0.0.1:1", "hi", 4, {})

    status, _ttft, _latency, _tokens, reason = asyncio.run(one())
    assert (status, reason) == ("error", "in the stream: the worker stopped")


def test_loadtest_with_no_successful_request_writes_valid_json_and_a_readable_table(monkeypatch, capsys):
    from logo.serve import loadtest

    async def refused(client, url, prompt, max_tokens, headers):
        return "error", None, 0.01, 0, "HTTP 400: no"

    monkeypatch.setattr(loadtest, "check_server", lambda url: None)
    monkeypatch.setattr(loadtest, "_one", refused)
    assert loadtest.percentile([], 50) is None
    loadtest.run_levels("http://127.0.0.1:1", [2], 1, 4, 10.0, None, json_out=True, prompts=["hi"])

    def not_json(constant):
        raise AssertionError(f"{constant} is not JSON")

    record = json.loads(capsys.readouterr().out, parse_constant=not_json)
    assert (record["ok"], record["errors"], record["first_error"]) == (0, 2, "HTTP 400: no")
    assert all(record[k] is None for k in ("ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s"))
    loadtest.run_levels("http://127.0.0.1:1", [2], 1, 4, 10.0, None, json_out=False, prompts=["hi"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.endswith("| - | - | - | - |") and "nan" not in row.lower()
