"""Placeholder: commands are added here."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
