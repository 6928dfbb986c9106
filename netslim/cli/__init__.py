"""The `netslim` command line: pipeline commands (commands.py) and deployment commands (deploy.py)."""

from netslim.cli import deploy  # noqa: F401  (registers export and pack)
from netslim.cli.commands import app, main

__all__ = ["app", "main"]
