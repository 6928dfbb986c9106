"""The `netslim` command line."""

from netslim.cli.commands import app, main

__all__ = ["app", "main"]
