"""The `logo` command line. Each area registers its own commands; this module wires them up."""

from __future__ import annotations

import typer

from logo import bench, cli_core, export, fit_cli
from logo.errors import exit_on_error
from logo.eval import cli as eval_cli
from logo.experiments import cli as experiments_cli
from logo.serve import cli as serve_cli
from logo.train import cli as train_cli

app = typer.Typer(
    name="logo",
    help="LoRA on the Go: route every prompt to a weighted mixture of LoRA adapters, training-free.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    """Each area adds its commands; the areas' modules import the model stack only inside their commands."""
    cli_core.register(app)
    fit_cli.register(app)
    eval_cli.register(app)
    train_cli.register(app)
    experiments_cli.register(app)
    bench.register(app)
    export.register(app)
    serve_cli.register(app)


def main() -> None:
    _register()
    exit_on_error(app)


if __name__ == "__main__":
    main()
