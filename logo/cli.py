"""The `logo` command line. Each area registers its own commands; this module wires them up."""

from __future__ import annotations

import sys

import typer

from logo.errors import LogoError

app = typer.Typer(
    name="logo",
    help="LoRA on the Go: route every prompt to a weighted mixture of LoRA adapters, training-free.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from logo import cli_core
    from logo.eval import cli as eval_cli
    from logo.train import cli as train_cli

    cli_core.register(app)
    eval_cli.register(app)
    train_cli.register(app)
    from logo import bench
    from logo.serve import cli as serve_cli

    bench.register(app)
    serve_cli.register(app)


def main() -> None:
    _register()
    try:
        app()
    except LogoError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
