"""The `esper` entry point. It only composes sub-apps; each lives in `commands/<name>.py`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text
from typer.core import TyperGroup

from commands import bench, forge, library, train, watch
from esper.errors import EsperError
from esper.workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV, Workspace
from esper_cli.context import EsperContext, LogLevel, configure_logging, err_console

log = logging.getLogger("esper")


class EsperGroup(TyperGroup):
    """Turns every failure into one line on stderr and the exit code of DESIGN.md section 14."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
            # usage errors (exit 2), explicit exits and Ctrl-C (130) are typer's to report
            raise
        except BrokenPipeError:
            # The reader went away (`esper ... | head`): click ends quietly (exit 1).
            raise
        except EsperError as e:
            _report(ctx, e)
            raise typer.Exit(e.exit_code) from None
        except Exception as e:  # a bug or an unexpected environment failure: still one line
            _report(ctx, e, unexpected=True)
            raise typer.Exit(1) from None


def _report(ctx, error: BaseException, unexpected: bool = False) -> None:
    obj = ctx.obj
    debug = isinstance(obj, EsperContext) and obj.debug
    if debug:
        err_console.print_exception(show_locals=False)
    prefix = f"internal error ({type(error).__name__})" if unexpected else "error"
    hint = "" if debug or not unexpected else " (rerun with --log-level debug for the traceback)"
    err_console.print(Text.assemble((f"{prefix}:", "bold red"), f" {one_line(error)}{hint}"),
                      soft_wrap=True)


def one_line(error: BaseException) -> str:
    """The error's message on one line: a multi-line one (a user model's exception, a library's
    report) has its lines stripped and joined with " / ", so a log or a `2>&1 | tail -1` keeps it
    whole."""
    lines = [line.strip() for line in str(error).splitlines()]
    text = " / ".join(line for line in lines if line)
    return text.replace(": / ", ": ")


app = typer.Typer(
    name="esper",
    cls=EsperGroup,
    help="Morphogenetic training: grow pre-compiled, pre-validated sub-networks into a live "
    "PyTorch model.\n\nExample: esper library init && esper library list",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(library.app, name="library")
app.add_typer(forge.app, name="forge")
app.add_typer(bench.app, name="bench")
app.command("train")(train.train)
app.add_typer(watch.app, name="watch")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"esper {version('esper')}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    workspace: Annotated[
        Path | None,
        typer.Option("--workspace", envvar=WORKSPACE_ENV, show_default=False,
                     help=f"Workspace directory (default: ./{DEFAULT_WORKSPACE})."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", envvar="ESPER_REDIS_URL", show_default=False,
                     help="External Redis (redis://, rediss://, unix://). Default: the "
                     "workspace's embedded server."),
    ] = None,
    log_level: Annotated[LogLevel, typer.Option("--log-level", help="Logging verbosity; "
                                                "debug also prints tracebacks.")] = LogLevel.INFO,
    json_output: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Esper's global options; they go before the subcommand."""
    configure_logging(log_level)
    ctx.obj = EsperContext(workspace=Workspace.resolve(workspace), redis_url=redis_url,
                           log_level=log_level, json=json_output)


def main() -> None:
    _open_closed_streams()
    try:
        app(prog_name="esper")
    finally:
        # Results still buffered (stdout to a pipe) are written here, where a reader that went
        # away ends the command as click ends one (exit 1, no message), not at interpreter exit
        # (exit 120 and "Exception ignored ... BrokenPipeError" on stderr).
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)


def _open_closed_streams() -> None:
    """Started with stdout or stderr closed (`esper forge >&-` under a supervisor): what would go
    there goes to /dev/null, as with `>/dev/null`; the command runs and its exit code tells.
    This also keeps the descriptor taken: the next file opened (the catalog's database) would
    otherwise get fd 1 or 2 and with it every print of a child process."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            # the stream lives as long as the process, as sys.stdout does
            setattr(sys, name, open(fd, "w", encoding="utf-8", closefd=False))  # noqa: SIM115
