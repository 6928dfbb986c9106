"""What the command line prints: one `error:` line for bad input, JSON for scripts, tables for people."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import MISSING, fields
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from netslim.errors import NetslimError

console = Console(stderr=True)


def guarded(fn: Any) -> Any:
    """Turn NetslimError (and a Ctrl-C) into one clear line and exit code 2."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NetslimError as e:
            sys.stderr.write(f"error: {e}\n")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]; nothing half-written was left in place")
            raise typer.Exit(130) from None

    return run


def emit(payload: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=1, default=str) + "\n")


def before_after_table(metrics: dict[str, Any]) -> Table:
    from netslim.report.markdown import comparison_rows

    b, a = metrics["before"], metrics["after"]
    t = Table(title=f"{metrics['method']} · {metrics['target'] or 'method default'}")
    for col in ("", "before", "after", "after/before"):
        t.add_column(col, justify="right" if col else "left")
    for r in comparison_rows(b, a):
        t.add_row(*[cell(v) for v in r])
    return t


def cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def option_rows(options: type) -> list[dict[str, Any]]:
    """A method's declared options: name, type, default and help, in declaration order."""
    from netslim.methods.common.fields import describe, help_of, hints

    types = hints(options)
    return [{"name": f.name, "type": describe(types[f.name]),
             "default": f.default if f.default is not MISSING else f.default_factory(),  # type: ignore[misc]
             "help": help_of(f)} for f in fields(options)]


def options_table(name: str, summary: str, rows: list[dict[str, Any]]) -> Table:
    t = Table("option", "type", "default", "help", title=escape(f"{name}: {summary}"), title_justify="left")
    for r in rows:  # escaped: "list[str]" is a type here, not rich markup
        t.add_row(*(escape(v) for v in (r["name"], r["type"], _shown(r["default"]), r["help"])))
    return t


def _shown(default: Any) -> str:
    """A default as it would be typed after --opt key= ("none" for None, a,b for a list)."""
    if default is None:
        return "none"
    if isinstance(default, tuple | list):
        return ",".join(str(v) for v in default)
    return str(default).lower() if isinstance(default, bool) else str(default)
