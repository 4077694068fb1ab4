"""The ``fcconv`` command line (``fcconv.cli:run``); ``app`` is its typer application."""

from fcconv.cli.app import app, run

__all__ = ["app", "run"]
