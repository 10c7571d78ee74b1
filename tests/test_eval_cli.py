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
    assert (config.base_model, config.model_dir) == ("Llama-3.1-8B", "hf_models")
    spec = config.engine_spec(methods)
    assert spec.base_model == str(tmp_path.joinpath("hf_models", "Llama-3.1-8B").relative_to(tmp_path))
    assert spec.adapters == ["hub:archon159/LoGo-loras-collection/Llama-3.1-8B-loras-flanv2/flanv2."]
    assert config.run_name() == "Llama-3.1-8B_selection_norm_n_20_seed_0"  # the official name, as without it


def test_user_mistakes_are_one_line_errors(monkeypatch, capsys, tmp_path):
    from logo import cli

    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (["run", "--dataset", "squad.v2", "--method", "base"], "error: unknown dataset 'squad.v2'"),
        (["run", "--method", "best"], "error: unknown method 'best'"),
        (["run", "--gpu", "0", "--device", "cpu"], "error: give --gpu or --device, not both"),
        (["run", "--dataset", "bbh.boolean_expressions,bbh.boolen_expressions", "--method", "base"],
         "error: unknown dataset 'bbh.boolen_expressions' (did you mean bbh.boolean_expressions?)"),
        (["run", "--model_dir", "hf_models"],
         "error: --model-dir hf_models: hf_models/Llama-3.1-8B is not a directory"),
        (["run", "--workers", "3"], "error: --workers needs --ray"),
        (["run", "--workers", "3", "--gpus-per-worker", "1"], "error: --workers and --gpus-per-worker need --ray"),
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


def test_model_dir_without_the_model_fails_before_anything_loads(monkeypatch, tmp_path):
    """A --model_dir that lacks <model_dir>/<base_model> is an error naming the path, not a silent hub download."""
    from logo.errors import LogoError

    monkeypatch.setattr(runner_mod, "resolve_adapters", lambda spec: pytest.fail("the library was resolved"))
    monkeypatch.setattr(runner_mod, "load_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "hf_models" / "Qwen2.5-7B").mkdir(parents=True)  # another model is there; a file named like ours:
    (tmp_path / "hf_models" / "Llama-3.1-8B").write_text("")
    config = runner_mod.RunConfig(model_dir=str(tmp_path / "hf_models"), dataset="bbh.navigate",
                                  output_dir=str(tmp_path / "out"))
    with pytest.raises(LogoError, match=r"--model-dir .*hf_models: .*hf_models/Llama-3.1-8B is not a directory"):
        runner_mod.run_methods(config, ["base"])
    assert not (tmp_path / "out").exists()


def test_ray_flags_need_ray_and_save_dir_is_noted(captured):
    app, calls = captured
    for flags in (["--workers", "4"], ["--gpus-per-worker", "0.5"]):
        result = CliRunner().invoke(app, ["run", "--dataset", "bbh.navigate", *flags])
        assert result.exit_code != 0 and "needs --ray" in str(result.exception) and not calls
    result = CliRunner().invoke(app, ["run", "--dataset", "bbh.navigate", "--save_dir", "interim"])
    assert result.exit_code == 0, result.output
    assert "note: --save-dir interim is not used" in result.output and len(calls) == 1
