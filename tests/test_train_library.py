"""The committed demo library matches its manifest and the task registry; `logo train` CLI errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from logo.adapter_source import EMBEDDED_LIBRARIES
from logo.errors import LogoError
from logo.train import cli as train_cli
from logo.train.library_builder import DEMO_CONFIG, build_library, sha256
from logo.train.tasks import get_task, seen_tasks, unseen_tasks
from logo.train.trainer import TrainConfig

demo = EMBEDDED_LIBRARIES["demo"]
needs_demo = pytest.mark.skipif(not (demo / "manifest.json").is_file(), reason="demo library not built")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((demo / "manifest.json").read_text())


@needs_demo
def test_committed_demo_library_matches_its_manifest(manifest):
    entries = manifest["adapters"]
    assert len(entries) >= 16 and len(manifest["unseen_tasks"]) >= 3
    assert sorted(e["name"] for e in entries) == sorted(p.parent.name for p in demo.glob("*/adapter_config.json"))
    for entry in entries:
        file = demo / entry["name"] / "adapter_model.safetensors"
        assert sha256(file) == entry["sha256"], f"{file} changed since the manifest was written"
        keys = {"task", "trained_templates", "held_out_templates", "seed", "steps", "wall_time_s", "n_eval"}
        assert keys <= set(entry)
        task = get_task(entry["name"])
        assert task.seen and entry["task"] == task.describe()
        assert entry["trained_templates"] == list(task.templates_for("train")) and len(entry["trained_templates"]) >= 7
        held_out = entry["held_out_templates"]
        assert held_out == {"valid": list(task.templates_for("valid")), "test": list(task.templates_for("eval"))}
        assert not set(entry["trained_templates"]) & set(held_out["valid"] + held_out["test"])
        assert entry["steps"] == DEMO_CONFIG.steps and entry["seed"] == DEMO_CONFIG.seed


@needs_demo
def test_every_adapter_beats_the_base_model_on_its_own_task(manifest):
    for entry in manifest["adapters"]:
        assert entry["own_accuracy"] > entry["base_accuracy"], f"{entry['name']} does not beat the base model"


@needs_demo
def test_manifest_lists_the_registry(manifest):
    assert [e["name"] for e in manifest["adapters"]] == [t.name for t in seen_tasks()]
    assert [u["name"] for u in manifest["unseen_tasks"]] == [t.name for t in unseen_tasks()]
    for entry, task in zip(manifest["unseen_tasks"], unseen_tasks()):
        assert entry["task"] == task.describe()


@needs_demo
def test_demo_library_is_small_and_attention_only():
    total = sum(f.stat().st_size for f in demo.rglob("*") if f.is_file())
    assert total < 15 * 2**20, "keep the committed library small"
    for config_file in demo.glob("*/adapter_config.json"):
        config = json.loads(config_file.read_text())
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] <= 8
        assert config["base_model_name_or_path"] == "smollm2-135m"


def run_logo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logo.cli", *args], capture_output=True, text=True, timeout=120)


def test_train_cli_user_errors(tmp_path):
    res = run_logo("train", "--task", "nope", "--out", str(tmp_path / "a"))
    assert res.returncode == 2 and "unknown task" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep me")
    res = run_logo("train", "--task", "parity", "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and "not empty" in res.stderr and (tmp_path / "b" / "x").read_text() == "keep me"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model fails the test: every check below must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was found")

    # the spec (which the builder's engine is built through) holds its own name for the loader: patched first, so
    # that importing it here binds the real loader, not the refusal, for later tests
    monkeypatch.setattr("logo.spec.load_base_model", refuse)
    monkeypatch.setattr("logo.models.load_base_model", refuse)


def invoke(*args: str):
    app = typer.Typer()
    train_cli.register(app)
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "{file}"], "--out {file} is a file, not a directory"),
    (["--device", "bogus"], "unknown device 'bogus'; use cpu, cuda or cuda:N"),
    (["--base-model", "nosuchmodel"], "unknown base model 'nosuchmodel'"),
    (["--steps", "0"], "--steps must be a whole number of at least 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--alpha", "-5"], "--alpha must be a positive number, got -5.0"),
    (["--rank", "0"], "--rank must be a whole number of at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--task", "last_letter"], "task 'last_letter' is unseen"),
])
def test_train_cli_refuses_bad_flags_before_loading_a_model(tmp_path, no_model_loads, args, message):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    args = [a.format(file=afile) for a in args]
    flags = {"--task": "parity", "--out": str(tmp_path / "new"), **dict(zip(args[::2], args[1::2]))}
    result = invoke("train", *[x for kv in flags.items() for x in kv])
    assert isinstance(result.exception, LogoError), result.exception
    assert message.format(file=afile) in str(result.exception) and "\n" not in str(result.exception)
    assert afile.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_cli_refuses_cuda_without_cuda(tmp_path, no_model_loads):
    result = invoke("train", "--task", "parity", "--out", str(tmp_path / "a"), "--device", "cuda")
    assert isinstance(result.exception, LogoError) and "no CUDA device; use --device cpu" in str(result.exception)


@pytest.mark.parametrize(("args", "message"), [
    (["--n-eval", "0"], "--n-eval must be at least 1"),
    (["--n-eval", "-1"], "--n-eval must be at least 1"),
    (["--out", "{file}"], "--out {file} is a file, not a directory"),
])
def test_build_cli_refuses_bad_flags_before_loading_a_model(tmp_path, no_model_loads, args, message):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    args = [a.format(file=afile) for a in args]
    flags = {"--out": str(tmp_path / "lib"), **dict(zip(args[::2], args[1::2]))}
    result = invoke("build-demo-library", *[x for kv in flags.items() for x in kv])
    assert isinstance(result.exception, LogoError), result.exception
    assert message.format(file=afile) in str(result.exception) and afile.read_text() == "keep me"


TINY_BUILD = TrainConfig(rank=2, alpha=4, steps=1, batch_size=1, lr=1e-2, warmup=1)


def test_build_removes_only_the_adapters_it_made(tmp_path, tiny_model_dir):
    lib = tmp_path / "lib"

    def build(*names: str) -> dict:
        return build_library(out_dir=lib, tasks=[get_task(n) for n in names], config=TINY_BUILD,
                             base_model=str(tiny_model_dir("llama")), n_eval=1, progress=False)

    build("parity", "uppercase")
    shutil.copytree(lib / "uppercase", lib / "my_adapter")  # a `logo train` output the user put in the library
    (lib / "notes").mkdir()
    (lib / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(LogoError, match="holds my_adapter, which `logo build-demo-library` did not make"):
        build("parity")
    assert {"my_adapter", "uppercase", "parity"} <= {p.name for p in lib.iterdir()}  # nothing was deleted
    shutil.rmtree(lib / "my_adapter")
    manifest = build("parity")  # uppercase: made by the last build, no longer built -> removed
    assert [a["name"] for a in manifest["adapters"]] == ["parity"]
    assert sorted(p.name for p in lib.iterdir() if p.is_dir()) == ["notes", "parity"]
    assert (lib / "notes" / "todo.txt").read_text() == "keep me"


def test_build_never_replaces_what_it_did_not_make(tmp_path, no_model_loads):
    lib = tmp_path / "lib"
    (lib / "parity").mkdir(parents=True)
    (lib / "parity" / "notes.txt").write_text("keep me")  # the user's folder where the parity adapter would go
    (lib / "uppercase").write_text("keep me too")
    with pytest.raises(LogoError, match="holds parity, uppercase \\(a file where the uppercase adapter goes\\)"):
        build_library(out_dir=lib, tasks=[get_task("parity"), get_task("uppercase")], n_eval=1, progress=False)
    assert (lib / "parity" / "notes.txt").read_text() == "keep me" and (lib / "uppercase").is_file()
    with pytest.raises(LogoError, match="'last_letter' is unseen"):
        build_library(out_dir=tmp_path / "new", tasks=[get_task("last_letter")], n_eval=1, progress=False)


def test_train_cli_defaults_are_the_demo_config():
    import inspect

    from logo.train.cli import train

    params = inspect.signature(train).parameters
    for name in ("rank", "alpha", "steps", "lr", "batch_size", "seed"):
        assert params[name].default == getattr(DEMO_CONFIG, name), name
    assert params["targets"].default == ",".join(DEMO_CONFIG.targets)


@needs_demo
def test_shipped_calibration_matches_the_library_as_loaded():
    """`embedded:demo` loads adapters in folder-name order; the calibration file must list them so."""
    from logo.adapter_source import resolve_adapters

    names = [name for name, _ in resolve_adapters("embedded:demo")]
    calibration = json.loads((demo / "logo_calibration.json").read_text())
    assert calibration["adapters"] == names and calibration["entries"]


def test_a_build_cut_off_while_writing_its_manifest_resumes(tmp_path, tiny_model_dir, monkeypatch):
    """The manifest is written atomically: a build stopped half-way through writing it leaves the last build's
    manifest, so the next build still knows its own adapters (and removes the one no longer built)."""
    from pathlib import Path

    lib = tmp_path / "lib"

    def build(*names: str) -> dict:
        return build_library(out_dir=lib, tasks=[get_task(n) for n in names], config=TINY_BUILD,
                             base_model=str(tiny_model_dir("llama")), n_eval=1, progress=False)

    build("parity", "uppercase")
    real = Path.write_text

    def cut_off(self, data, *args, **kwargs):
        if "manifest" in self.name:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt  # the build is stopped mid-manifest
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut_off)
    with pytest.raises(KeyboardInterrupt):
        build("parity", "uppercase")
    monkeypatch.undo()
    assert [a["name"] for a in json.loads((lib / "manifest.json").read_text())["adapters"]] == ["parity", "uppercase"]
    assert not [p.name for p in lib.iterdir() if p.name.endswith(".tmp.json")]  # no temporary file left
    manifest = build("parity")
    assert [a["name"] for a in manifest["adapters"]] == ["parity"] and not (lib / "uppercase").exists()


def test_a_retrained_library_never_keeps_the_old_router(tmp_path, tiny_model_dir, monkeypatch):
    """Retraining removes the library's router and statistics first: a fit that then fails leaves no router fitted
    to the old adapters (the next build fits one); a build that retrains nothing keeps a valid router if its fit
    fails, and replaces it only with a finished fit."""
    import logo.train.library_builder as builder
    from logo.router_file import FILE_NAME as ROUTER_FILE

    lib = tmp_path / "lib"

    def build(force: bool = False) -> dict:
        return build_library(out_dir=lib, tasks=[get_task("parity"), get_task("uppercase")], config=TINY_BUILD,
                             base_model=str(tiny_model_dir("llama")), n_eval=1, force=force, progress=False)

    build()
    router = (lib / ROUTER_FILE).read_text()

    def fit_fails(*args, **kwargs):
        raise RuntimeError("the fit failed")

    monkeypatch.setattr(builder, "fit_router", fit_fails)
    with pytest.raises(RuntimeError):
        build()  # nothing retrained: the router still fits these adapters
    assert (lib / ROUTER_FILE).read_text() == router
    with pytest.raises(RuntimeError):
        build(force=True)  # retrained: the old router must not stay beside the new adapters
    assert not (lib / ROUTER_FILE).exists()
    monkeypatch.undo()
    build()  # resumes: nothing to retrain, the router is fitted again
    assert json.loads((lib / ROUTER_FILE).read_text())["adapters"] == ["parity", "uppercase"]
    assert (lib / "logo_calibration.json").is_file()


def test_replacing_keeps_the_old_file_until_the_new_one_is_whole(tmp_path):
    from logo.paths import replacing, write_atomic

    target = tmp_path / "summary.json"
    write_atomic(target, "old")
    with pytest.raises(KeyboardInterrupt), replacing(target) as tmp:
        tmp.write_text("half of the ne")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with replacing(target, fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp.name.startswith(".")
        tmp.write_text("new")
    write_atomic(tmp_path / "weights.bin", b"\x00\x01")
    assert target.read_text() == "new" and (tmp_path / "weights.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "weights.bin"]
