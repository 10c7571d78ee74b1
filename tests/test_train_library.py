"""The committed demo library matches its manifest and the task registry; `logo train` CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from logo.adapter_source import EMBEDDED_LIBRARIES
from logo.train.library_builder import DEMO_CONFIG, sha256
from logo.train.tasks import get_task, seen_tasks, unseen_tasks

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
