"""`logo bench` end to end on a tiny shape: the JSON contract and the table (not a timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import logo.bench
from logo.bench import Bench, bench, distinct_picks, pooled_picks, run_bench
from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.mixture import Mixture, _StaticSlot
from logo.perf.report import print_table
from logo.perf.timing import time_generate
from logo.synthetic import SHAPES, random_model, write_random_library

CLI = [sys.executable, "-m", "logo.cli", "bench", "--shape", "tiny", "--n-adapters", "3", "--rank", "2", "--k", "2",
       "--prompt-len", "8", "--new-tokens", "3", "--batch-sizes", "1", "--repeats", "1"]
TINY = dict(shape="tiny", n_adapters=3, rank=2, k=2, prompt_len=8, new_tokens=3, batch_sizes="1", repeats=1)


def test_bench_json_contract():
    result = run_bench("tiny", "cpu", n_adapters=4, rank=4, k=2, targets=["q_proj", "v_proj"], prompt_len=8,
                       new_tokens=3, batch_sizes=[1, 2], repeats=1)
    for key in ("device", "shape", "n_adapters", "rank", "k", "load_s", "prefill_ms", "probe_ms", "decode_tok_s",
                "ttft_ms", "peak_mem_gb", "ratios"):
        assert key in result
    assert (result["device"], result["shape"], result["n_adapters"], result["rank"], result["k"]) == (
        "cpu", "tiny", 4, 4, 2)
    for table in ("decode_tok_s", "decode_tok_s_mean", "ttft_ms"):
        rows = result[table]
        assert set(rows) == {"base", "one_adapter", "logo", "logo_mid_signal", "logo_shared_pool", "official"}
        assert set(rows["logo"]) == {"1", "2"} and set(rows["official"]) == {"1"}
        assert all(v > 0 for row in rows.values() for v in row.values())
    assert set(result["ratios"]["decode_over_base"]) == {"one_adapter", "logo", "logo_mid_signal",
                                                         "logo_shared_pool", "official"}
    assert result["distinct_mixtures"] == 2
    by_layer = result["first_token_by_layer"]
    assert by_layer["prefill_ms"] > 0 and list(by_layer["by_layer_ms"]) == ["0", "1"]  # tiny: 2 layers
    assert set(result["ratios"]["first_token_by_layer_over_prefill"]) == {"0", "1"}
    assert result["union_adapters"]["logo_shared_pool"] <= result["union_adapters"]["logo"] <= 4
    json.dumps(result)  # JSON-ready


def test_bench_fast_path_static():
    result = run_bench("tiny", "cpu", n_adapters=4, rank=4, k=2, targets=["q_proj", "v_proj"], prompt_len=8,
                       new_tokens=3, batch_sizes=[1, 2], repeats=1, fast="static")
    fast = result["fast"]
    assert fast["path"] == "static"
    for table in ("decode_tok_s", "ttft_ms", "warmup_s"):
        assert set(fast[table]) == {"base", "one_adapter", "logo"}
        assert all(set(row) == {"1", "2"} for row in fast[table].values())
    assert set(result["ratios"]["fast_decode_over_base"]) == {"one_adapter", "logo"}
    assert set(result["ratios"]["fast_logo_over_eager_base"]) == {"1", "2"}
    with pytest.raises(LogoError, match="--fast must be one of"):
        run_bench("tiny", "cpu", n_adapters=4, rank=4, k=2, targets=["q_proj"], prompt_len=8, new_tokens=3,
                  batch_sizes=[1], repeats=1, fast="turbo")


def test_bench_cli_table_json_and_errors(tmp_path):
    res = subprocess.run(CLI + ["--save", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "decode tokens/s" in res.stdout and "official" in res.stdout
    assert "add 1 to --batch-sizes" not in res.stdout  # measured at batch 1: a row, no note
    assert json.loads((tmp_path / "r.json").read_text())["shape"] == "tiny"
    res = subprocess.run(CLI + ["--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["decode_tok_s"]["official"]["1"] > 0
    for extra, message in ((["--shape", "gpt-9"], "unknown shape"), (["--k", "9"], "--k must be between"),
                           (["--targets", "v_proj"], "must include q_proj"), (["--new-tokens", "1"], "at least 2"),
                           (["--batch-sizes", "1,x"], "comma-separated"), (["--targets", "q_proj,foo"], "foo"),
                           (["--threads", "-1"], "--threads must be at least 1")):
        res = subprocess.run(CLI + extra, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and message in res.stderr, (extra, res.stderr)
        assert "Traceback" not in res.stderr
    if not torch.cuda.is_available():
        res = subprocess.run(CLI + ["--device", "cuda"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "no CUDA device" in res.stderr


def test_bench_checks_targets_threads_and_save_before_the_run(tmp_path, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark started before its arguments were checked")

    monkeypatch.setattr(logo.bench, "Bench", no_run)
    (tmp_path / "file").write_text("")
    for extra, message in (
        (dict(targets="q_proj,foo"), r"--targets names no module of tiny: foo; choose from q_proj, k_proj, v_proj"),
        (dict(targets="q_proj,lm_head,bar"), "lm_head, bar"),
        (dict(threads=-1), "--threads must be at least 1, got -1"),
        (dict(threads=0), "--threads must be at least 1, got 0"),
        (dict(save=tmp_path), "--save .* is a directory; give a file path"),
        (dict(save=tmp_path / "file" / "r.json"), "--save .*file is a file, not a directory"),
    ):
        with pytest.raises(LogoError, match=message) as err:
            bench(**{**TINY, **extra})
        assert "\n" not in str(err.value)
    with pytest.raises(LogoError, match="foo"):
        run_bench("tiny", "cpu", 3, 2, 2, ["q_proj", "foo"], 8, 3, [1], 1)


def test_bench_prints_before_saving_and_reports_progress_on_stderr(tmp_path, monkeypatch, capsys):
    """stdout holds the result only (here the JSON), printed before --save is written: a write that fails at the
    end (here: the path became a directory during the run) loses nothing; the progress bar names each step."""
    save = tmp_path / "out" / "r.json"
    real = logo.bench.run_bench

    def run_then_block_save(*args, **kwargs):
        result = real(*args, **kwargs)
        save.mkdir()
        return result

    monkeypatch.setattr(logo.bench, "run_bench", run_then_block_save)
    with pytest.raises(LogoError, match="cannot write --save .*; the result is printed above"):
        bench(**TINY, json_out=True, save=save)
    out, err = capsys.readouterr()
    assert json.loads(out)["shape"] == "tiny"
    for step in ("random tiny model", "probe vs prefill", "decode warm-up: batch 1, official",
                 "decode: batch 1, logo_shared_pool, run 1/1"):
        assert step in err, step
    assert Path(save).parent.is_dir()


def test_random_library_is_valid_peft_layout(tmp_path):
    model = random_model("tiny", "cpu", torch.float32)
    write_random_library(model, tmp_path, n=3, rank=2, targets=["q_proj"])
    assert json.loads((tmp_path / "adapter_000" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lib = AdapterLibrary.load(tmp_path, model)
    assert len(lib) == 3 and all(m.endswith("q_proj") for m in lib.modules)
    assert {"llama-3.1-8b", "qwen2.5-7b", "deepseek-7b", "smollm2-135m"} <= set(SHAPES)


def test_time_generate_counts_every_token_and_distinct_picks():
    model = random_model("tiny", "cpu", torch.float32)
    ids = torch.randint(3, 500, (2, 5))
    timing = time_generate(model, ids, torch.ones_like(ids), 4)
    assert len(timing.steps_s) == 3 and timing.ttft_s > 0 and timing.decode_tok_s > 0
    with pytest.raises(ValueError):
        time_generate(model, ids, torch.ones_like(ids), 1)
    picks = distinct_picks(16, 3, 16, seed=0)
    assert len({frozenset(p) for p in picks}) == 16 and all(len(set(p)) == 3 for p in picks)
    pooled = pooled_picks(260, 20, 16, seed=0)
    assert len({frozenset(p) for p in pooled}) == 16 and len({i for p in pooled for i in p}) <= 40


def test_base_model_runs_hook_free_outside_a_mixture(tmp_path):
    """The bench's base variant (and the LoGo probe) must not pay for idle mixture hooks."""
    model = random_model("tiny", "cpu", torch.float32)
    write_random_library(model, tmp_path, n=3, rank=2, targets=["q_proj", "v_proj"])
    mixture = Mixture(model, AdapterLibrary.load(tmp_path, model))

    def hooked() -> int:  # forward hooks (add the factors) and pre-hooks (merge a shared mixture when it pays)
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    assert hooked() == 0
    mixture.set(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    assert hooked() == 2 * len(mixture.factors) > 0
    with mixture.suspended():
        assert hooked() == 0
    assert hooked() == 2 * len(mixture.factors)
    mixture.set(torch.tensor([[0, 1], [2, 1]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    assert hooked() == len(mixture.factors) > 0, "per-row mixtures never merge: no idle pre-hook on them"
    mixture.clear()
    assert hooked() == 0 and not mixture.active


def _small_bench(tmp_path: Path, k: int = 4) -> Bench:
    """A tiny-shape bench of 8 rank-4 adapters (q_proj, v_proj), mixtures of ``k``, up to batch 2."""
    return Bench("tiny", "cpu", n_adapters=8, rank=4, k=k, targets=["q_proj", "v_proj"], prompt_len=8, new_tokens=3,
                 max_batch=2, library_dir=tmp_path / "library")


def _active_widths(model: torch.nn.Module) -> set[int]:
    """Columns per row of every static-mixture hook switched on in ``model`` (what its bmm multiplies)."""
    return {hook.a.shape[1] for m in model.modules() for hook in m._forward_hooks.values()
            if isinstance(hook, _StaticSlot) and hook.switch.on}


def test_fast_one_adapter_is_one_adapter_wide(tmp_path, monkeypatch):
    """On the fast path a mixture is k_cap * r wide whatever it holds: one adapter must run on its own k = 1
    engine (r columns), LoGo on k * r, and the phase leaves no hook on the model."""
    b = _small_bench(tmp_path)
    seen: list[set[int]] = []
    real = logo.bench.time_static

    def spy(decoder, ids, mask, new_tokens, setup=None):
        def observed_setup():
            if setup is not None:
                setup()
            seen.append(_active_widths(decoder.model))
        return real(decoder, ids, mask, new_tokens, observed_setup)

    monkeypatch.setattr(logo.bench, "time_static", spy)
    result = b.fast_decode("static", [2], repeats=1)
    assert all(v > 0 for row in result["decode_tok_s"].values() for v in row.values())
    rank, k = 4, 4
    # warm-up then one interleaved run, each in FAST_VARIANTS order: base (no mixture), one adapter, LoGo
    assert seen == [set(), {1 * rank}, {k * rank}] * 2
    assert _active_widths(b.model) == set() and not any(
        isinstance(h, _StaticSlot) for m in b.model.modules() for h in m._forward_hooks.values())


def test_mid_layer_probe_routes_like_the_last_layer_probe(tmp_path, monkeypatch):
    """probe_ms and probe_mid_layer_ms time the same work (route_batch: probe, score, select), at two layers."""
    b = _small_bench(tmp_path, k=2)
    routed: list[int] = []
    real = LoGoEngine.route_batch

    def spy(engine, ids, mask):
        routed.append(engine.router.config.layer)
        return real(engine, ids, mask)

    monkeypatch.setattr(LoGoEngine, "route_batch", spy)
    result = b.probe_vs_prefill(repeats=1)
    n = b.model.config.num_hidden_layers
    assert result["probe_mid_layer"] == n // 2
    assert sorted(set(routed)) == [-1, n // 2]  # the official last layer, then the middle one
    assert routed.count(-1) == routed.count(n // 2) == 1 + 3  # a warm-up and max(3, repeats) timed rounds


@pytest.mark.parametrize("n", [2, 4, 24, 30, 32])
def test_signal_layers_are_a_quarter_half_three_quarters_deep_and_last(n):
    """The probe at layer i runs i layers first: f deep is layer int(f * n), for every fraction alike."""
    layers = Bench.signal_layers(SimpleNamespace(engine=SimpleNamespace(num_layers=n)))
    assert layers == sorted({int(n * f) for f in (0.25, 0.5, 0.75)} | {n - 1})


def test_official_path_not_measured_is_said_not_left_blank(capsys):
    """Without batch 1 in --batch-sizes the official path is not timed: the JSON keeps its empty row, the table
    leaves it out and says how to get it."""
    result = run_bench("tiny", "cpu", n_adapters=4, rank=2, k=2, targets=["q_proj", "v_proj"], prompt_len=8,
                       new_tokens=3, batch_sizes=[2], repeats=1)
    assert result["decode_tok_s"]["official"] == {} and result["ttft_ms"]["official"] == {}
    print_table(result)
    out = capsys.readouterr().out
    rows = [line.split()[1] for line in out.splitlines() if line.startswith("│")]
    assert rows == ["base", "one_adapter", "logo", "logo_mid_signal", "logo_shared_pool"]
    assert "official (PEFT) path: measured at batch 1 only; add 1 to --batch-sizes" in out
