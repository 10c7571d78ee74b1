"""`logo run` / `logo compare` command lines: the official spellings and defaults, and one-line errors."""

from __future__ import annotations

import sys

import pytest
import typer
from typer.testing import CliRunner

from logo.eval import cli as eval_cli
from logo.eval import runner as runner_mod


@pytest.fixture
def captured(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(runner_mod, "run_methods", lambda config, methods: calls.append((config, methods)))
    monkeypatch.chdir(tmp_path)  # no ./data here
    app = typer.Typer()
    eval_cli.register(app)
    return app, calls


def test_official_defaults_and_both_spellings(captured):
    app, calls = captured
    result = CliRunner().invoke(app, ["run", "--dataset", "bbh.boolean_expressions"])
    assert result.exit_code == 0, result.output
    config, methods = calls[-1]
    assert (config.base_model, config.selection_strategy, config.n_selected_modules, config.seed) == (
        "Llama-3.1-8B", "norm", 20, 0)
    assert (config.generation_early_stop, config.max_new_tokens, config.output_dir, config.data_dir) == (
        False, 256, "results", None)
    assert methods == ["logo"] and config.method == "logo"
    official = ["run", "--base_model", "Qwen2.5-7B", "--selection_strategy", "entropy", "--n_selected_modules", "5",
                "--generation_early_stop", "--data_dir", "d", "--result_dir", "out", "--gpu", "1", "--seed", "3"]
    assert CliRunner().invoke(app, official).exit_code == 0
    dashed = ["run", "--base-model", "Qwen2.5-7B", "--selection-strategy", "entropy", "--n-selected-modules", "5",
              "--generation-early-stop", "--data-dir", "d", "--output-dir", "out", "--device", "cuda:1", "--seed", "3"]
    assert CliRunner().invoke(app, dashed).exit_code == 0
    assert calls[-1] == calls[-2]
    assert calls[-1][0].device == "cuda:1" and calls[-1][0].n_selected_modules == 5
    assert CliRunner().invoke(app, [("--result-dir" if a == "--output-dir" else a) for a in dashed]).exit_code == 0
    assert calls[-1] == calls[-2]


def test_method_lists_and_official_data_dir(captured, tmp_path):
    app, calls = captured
    (tmp_path / "data").mkdir()
    (tmp_path / "hf_models" / "Llama-3.1-8B").mkdir(parents=True)
    result = CliRunner().invoke(app, ["run", "--method", "logo, base,arrow", "--model_dir", "hf_models"])
    assert result.exit_code == 0, result.output
    config, methods = calls[-1]
    assert methods == ["logo", "base", "arrow"] and config.data_dir == "data"
    assert config.base_model.endswith("hf_models/Llama-3.1-8B")
    assert config.adapters == ["hub:archon159/LoGo-loras-collection/Llama-3.1-8B-loras-flanv2/flanv2."]


def test_user_mistakes_are_one_line_errors(monkeypatch, capsys, tmp_path):
    from logo import cli

    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (["run", "--dataset", "squad.v2", "--method", "base"], "error: unknown dataset 'squad.v2'"),
        (["run", "--method", "best"], "error: unknown method 'best'"),
        (["run", "--gpu", "0", "--device", "cpu"], "error: give --gpu or --device, not both"),
        (["compare", str(tmp_path)], "error: no `logo run` results"),
    ):
        monkeypatch.setattr(sys, "argv", ["logo", *argv])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err


def test_fitted_says_which_router_flags_it_ignores(captured):
    """Method fitted routes as the router file says: flags set away from the official router are named, not
    silently dropped; the official defaults draw no note."""
    app, calls = captured
    quiet = CliRunner().invoke(app, ["run", "--dataset", "bbh.boolean_expressions", "--method", "logo,fitted"])
    assert quiet.exit_code == 0 and "note" not in quiet.output, quiet.output
    noted = CliRunner().invoke(app, ["run", "--dataset", "bbh.boolean_expressions", "--method", "fitted",
                                     "--n_selected_modules", "5", "--signal-layer", "-3"])
    assert noted.exit_code == 0, noted.output
    assert "--n-selected-modules, --signal-layer apply only to the other methods" in noted.output
