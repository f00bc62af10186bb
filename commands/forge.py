"""`esper forge`: Tezzeret, the compilation forge (a daemon; `--once` for cron and CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from esper_cli.context import get_context, out_console, progress_printer

app = typer.Typer(no_args_is_help=False, subcommand_metavar="")


def _load_config(ctx: typer.Context, param, path: Path | None) -> Path | None:
    """Read a YAML forge config into the defaults of the other options: flags given on the
    command line still win. Keys are the option names (`lease_seconds` or `lease-seconds`)."""
    if path is None:
        return None
    import yaml

    from esper.errors import BadInputError, NotFoundError

    if not path.exists():
        raise NotFoundError(f"{path}: no such config file")
    if not path.is_file():
        raise BadInputError(f"{path}: not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: not a text file") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise BadInputError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a mapping of option names to values")
    options = {p.name: p for p in ctx.command.params if p.name not in ("config", "help")}
    defaults = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in options:
            raise BadInputError(f"{path}: unknown key {key!r}; expected one of "
                                f"{', '.join(sorted(options))}")
        try:
            options[name].process_value(ctx, value)  # the check the flag would get
        except typer.BadParameter as e:
            raise BadInputError(f"{path}: key {key!r}: {e.message}") from None
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


@app.callback(invoke_without_command=True)
def forge(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(
        "--config", is_eager=True, callback=_load_config, show_default=False,
        help="YAML file of option values (see configs/forge.yaml); flags given here win.")] = None,
    once: Annotated[bool, typer.Option(
        "--once", help="Do the work there is now, then exit (cron, CI).")] = False,
    max_jobs: Annotated[int | None, typer.Option(
        min=1, help="Stop after this many compile jobs (built or failed).")] = None,
    pipelines: Annotated[str | None, typer.Option(
        help="Comma-separated: fast, standard, aggressive. Default: fast, plus standard on "
        "CUDA devices.")] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="cpu, cuda or cuda:N (repeatable). Default: cpu.")] = None,
    interface: Annotated[list[str] | None, typer.Option(
        "--interface", help="Also build for linear:IN:OUT or conv2d:IN:OUT[:STRIDE] "
        "(repeatable), besides the interfaces runs registered.")] = None,
    dtype: Annotated[list[str] | None, typer.Option(
        "--dtype", help="dtype of the --interface kernels: float32, bfloat16, float16 "
        "(repeatable). Default: float32.")] = None,
    lease_seconds: Annotated[float, typer.Option(
        min=1, help="Claim lease; renewed while working, so a dead forge's blueprint returns "
        "to the queue after this.")] = 120.0,
    wall_limit_s: Annotated[float | None, typer.Option(
        min=0.01, help="Wall-clock limit per compile job, every pipeline. Default: fast 120, "
        "standard 1800, aggressive 7200.")] = None,
    cpu_limit_s: Annotated[float | None, typer.Option(
        min=1, help="CPU-time limit per compile job (RLIMIT_CPU). Default: twice the "
        "wall-clock limit.")] = None,
    memory_limit_mb: Annotated[float | None, typer.Option(
        min=1, help="Resident-memory limit per compile job, torch included. Default: half the "
        "machine's memory, at most 16384.")] = None,
    poll_interval_s: Annotated[float, typer.Option(
        min=0.05, help="How often to look at Urza when no bus notice wakes the forge.")] = 5.0,
    grace_s: Annotated[float, typer.Option(
        min=0, help="On SIGINT/SIGTERM, how long the current job may still run before it is "
        "stopped and the claim released.")] = 10.0,
    warm: Annotated[bool, typer.Option(
        "--warm/--no-warm", help="Run fast jobs in one long-lived worker process (torch "
        "imported once) instead of a fresh process per job.")] = True,
    idle: Annotated[bool, typer.Option(
        "--idle/--no-idle", help="When nothing waits, recompile high-interest blueprints and "
        "those built with an older toolchain.")] = True,
    interest_threshold: Annotated[float, typer.Option(
        min=0, help="Idle work: tamiyo_interest at which a blueprint gets the aggressive "
        "pipeline.")] = 1.0,
    daily_budget: Annotated[int, typer.Option(
        min=0, help="Idle work stops once the workspace has compiled this many kernels today "
        "(UTC).")] = 500,
    worker_id: Annotated[str | None, typer.Option(
        help="This forge's name in claims and the audit log. Default: forge-HOST-PID.")] = None,
) -> None:
    """Compile blueprints into signed kernel artifacts (Tezzeret, a daemon).

    Claims UNVALIDATED blueprints, validates them (INVALID with the reason otherwise), and
    builds one kernel per interface, device, dtype and pipeline in a sandboxed child process:
    for the interfaces runs registered and those given with --interface. Kernels are registered
    PENDING_BENCHMARKING and announced on the bus. When idle, it catches up interfaces
    registered later and recompiles high-interest or outdated blueprints within a daily budget.
    Progress goes to stderr, one line per job; the summary to stdout. SIGINT/SIGTERM finish or
    release the current claim and exit 0.

    Example: esper forge --once --interface linear:64:16 --interface linear:128:32
    """
    del config  # applied by its callback, as the other options' defaults
    from dataclasses import replace

    from esper.contracts import CompilationPipeline, KernelInterface
    from esper.errors import BadInputError
    from pipelines.tezzeret.forge import ForgeOptions, run_forge

    ectx = get_context(ctx)
    chosen = None
    if pipelines is not None:
        try:
            chosen = tuple(dict.fromkeys(CompilationPipeline(p.strip().lower())
                                         for p in pipelines.split(",") if p.strip()))
        except ValueError:
            raise BadInputError(f"--pipelines {pipelines!r}: choose from fast, standard, "
                                "aggressive") from None
    options = ForgeOptions(
        devices=tuple(device or ("cpu",)), pipelines=chosen, dtypes=tuple(dtype or ("float32",)),
        interfaces=tuple(dict.fromkeys(KernelInterface.parse(i) for i in interface or ())),
        lease_seconds=lease_seconds, poll_interval_s=poll_interval_s, max_jobs=max_jobs,
        warm_fast=warm, grace_s=grace_s, idle_work=idle, interest_threshold=interest_threshold,
        daily_compile_budget=daily_budget)
    if worker_id is not None:
        options = replace(options, worker_id=worker_id)
    if cpu_limit_s is None and wall_limit_s is not None:
        cpu_limit_s = 2 * wall_limit_s
    options = options.with_limits(wall_s=wall_limit_s, cpu_s=cpu_limit_s,
                                  memory_mb=memory_limit_mb)

    summary = run_forge(ectx.workspace.require(), ectx.redis_url, options, once=once,
                        progress=progress_printer())
    ectx.emit(summary.to_jsonable(), lambda: _render(summary))


def _render(summary) -> None:
    from commands._render import print_table

    out_console.print(f"forge {summary.worker_id}: {summary.blueprints} blueprints claimed, "
                      f"{summary.compiled} compiled, {summary.invalid} invalid, "
                      f"{summary.released} released; {len(summary.built)} kernels built, "
                      f"{len(summary.failures)} jobs failed in {summary.seconds:.1f} s",
                      highlight=False, soft_wrap=True)
    if summary.pipelines:
        rows = [[name, str(t.built), str(t.failed), f"{t.seconds:.2f}"]
                for name, t in sorted(summary.pipelines.items())]
        print_table("by pipeline", ["pipeline", "built", "failed", "seconds in sandbox"], rows)
    for failure in summary.failures:
        out_console.print(Text.assemble(("failed:", "red"), f" {failure.line()}"),
                          soft_wrap=True)
