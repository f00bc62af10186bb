"""What every subcommand gets from the root: the global options, resolved once."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from esper.workspace import Workspace

# Diagnostics and progress go to stderr; stdout carries results only (tables or JSON).
# Off a terminal (a pipe, cron, a CI log, a closed stdout) nothing knows the width: print tables
# whole rather than cut to rich's default of 80 columns.
# What they print is mostly ids, paths, names and messages from users and data, so neither reads
# a string as markup (`[/]` would raise, `[bold]` vanish) or emoji codes (`linear:-1:16`); a
# styled part is a `Text` with a style: `Text.assemble(("error:", "bold red"), " ", message)`.
err_console = Console(stderr=True, markup=False, emoji=False)
out_console = Console(width=None if sys.stdout is not None and sys.stdout.isatty() else 240,
                      markup=False, emoji=False)


class LogLevel(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class EsperContext:
    workspace: Workspace
    redis_url: str | None
    log_level: LogLevel
    json: bool

    @property
    def debug(self) -> bool:
        return self.log_level is LogLevel.DEBUG

    def emit(self, data: Any, render=None) -> None:
        """Print a result: JSON with --json or when stdout is not for humans, else `render()`."""
        if self.json or render is None:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        else:
            render()


def get_context(ctx: typer.Context) -> EsperContext:
    return ctx.find_root().obj


def progress_printer():
    """One line per event of a daemon (forge, bench): time-stamped and dimmed on a terminal,
    plain and flushed elsewhere (a log file, CI, a tmux pane piped to a file)."""
    if not err_console.is_terminal:
        def plain(line: str) -> None:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        return plain

    def styled(line: str) -> None:
        from datetime import datetime

        err_console.print(Text.assemble((f"{datetime.now():%H:%M:%S}", "dim"), " ", line),
                          soft_wrap=True)
    return styled


def configure_logging(level: LogLevel) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=level is LogLevel.DEBUG,
                          rich_tracebacks=level is LogLevel.DEBUG)
    logging.basicConfig(level=level.value.upper(), format="%(message)s", handlers=[handler],
                        force=True)
