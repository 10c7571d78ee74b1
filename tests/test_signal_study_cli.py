"""`logo signal-study`: its flags are checked before the study, the table is printed before it is written, and
its help says what the table covers; `logo demo`'s flags are checked before its model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

import logo.experiments.signal_study as study
from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.experiments.cli import demo, signal_study
from logo.library import AdapterLibrary
from logo.router import RouterConfig

ROW = study.StudyRow(29, False, "last", "norm", "none", 0.5)


def test_flags_are_checked_before_the_study(tmp_path, monkeypatch):
    def no_study(*args, **kwargs):
        raise AssertionError("the study started before its flags were checked")

    monkeypatch.setattr(study, "study_demo", no_study)
    (tmp_path / "file").write_text("")
    for kwargs, message in (
        (dict(n_per_task=0), "--n-per-task must be at least 1, got 0"),
        (dict(output=tmp_path), "--output .* is a directory; give a file path"),
        (dict(output=tmp_path / "file" / "x.md"), "--output .*file is a file, not a directory"),
    ):
        with pytest.raises(LogoError, match=message):
            signal_study(**kwargs)
    res = subprocess.run([sys.executable, "-m", "logo.cli", "signal-study", "--n-per-task", "0"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "error: --n-per-task must be at least 1" in res.stderr
    assert "Traceback" not in res.stderr


def test_output_in_a_new_directory_and_printed_before_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "study_demo", lambda n_per_task, progress=False: [ROW])
    output = tmp_path / "nodir" / "x.md"
    signal_study(n_per_task=1, output=output)
    table = capsys.readouterr().out
    assert "| 29 (-1) | residual | last | norm | none | 0.500 |" in table
    assert output.read_text() == table

    def study_then_block(n_per_task, progress=False):
        output.unlink()
        output.mkdir()  # the path changed during the study
        return [ROW]

    monkeypatch.setattr(study, "study_demo", study_then_block)
    with pytest.raises(LogoError, match="cannot write --output .*; the table is printed above"):
        signal_study(n_per_task=1, output=output)
    assert "| 29 (-1) |" in capsys.readouterr().out


def test_help_says_what_the_table_covers(tiny_library, tokenizer):
    model, root = tiny_library("llama")
    engine = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=1))
    prompts = ["Q: 2 + 2 =\nA:", "Translate to French: cat", "Summarize: the sky is blue."]
    try:
        rows = study.run_study(engine, prompts, [0, 1, 2], prompts[:2], [-1], batch_size=2)
        module = engine.router.config.module
    finally:
        engine.close()
    help_text = " ".join(signal_study.__doc__.split())
    assert "every" not in help_text
    assert {r.calibration for r in rows} == set(study.CALIBRATIONS) and "zscore" not in study.CALIBRATIONS
    assert {r.strategy for r in rows} == set(study.STRATEGIES) and {r.position for r in rows} == set(study.POSITIONS)
    assert module == RouterConfig().module == "q_proj"
    covered, not_covered = help_text.split("Not covered:")
    assert f"the {module} signal module at {len(study.DEMO_LAYERS)} layers (last to 30th from last)" in covered
    assert min(study.DEMO_LAYERS) == -30 and max(study.DEMO_LAYERS) == -1
    assert "calibration none, mean or weight-norm" in covered and "norm or entropy strategy" in covered
    assert "last-token or mean position" in covered and "residual or post-norm input" in covered
    assert "zscore calibration" in not_covered and "other signal modules" in not_covered


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_per_task=0), "^--n-per-task must be a whole number of at least 1, got 0$"),
    (dict(n_per_task=-2), "^--n-per-task must be a whole number of at least 1, got -2$"),
    (dict(batch_size=0), "^--batch-size must be a whole number of at least 1, got 0$"),
    (dict(quick=True, n_per_task=6), "^--quick runs 2 instances per task, so it cannot take --n-per-task 6; give "
                                     "one of --quick or --n-per-task$"),
])
def test_demo_flags_are_checked_before_the_model_loads(tmp_path, monkeypatch, kwargs, message):
    from logo.experiments import demo as demo_module

    def build(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(demo_module.EngineSpec, "build", build)
    with pytest.raises(LogoError, match=message):
        demo(output=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_demo_instances_per_task():
    from logo.experiments.demo import check_demo_options

    assert check_demo_options(None, 32, quick=False) == 6  # the published demo's
    assert check_demo_options(None, 32, quick=True) == 2
    assert check_demo_options(3, 1, quick=False) == 3
    res = subprocess.run([sys.executable, "-m", "logo.cli", "demo", "--quick", "--n-per-task", "4"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: --quick runs 2 instances per task, so it cannot take --n-per-task 4; give one of --quick or "
        "--n-per-task"]
