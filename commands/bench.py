"""`esper bench`: Urabrask, the characterization gauntlet (a daemon; `--once` for cron and CI)."""

from __future__ import annotations

from typing import Annotated

import typer

from esper_cli.context import get_context, out_console, progress_printer

app = typer.Typer(no_args_is_help=False, subcommand_metavar="")


@app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option(
        "--once", help="Judge the kernels waiting now, then exit (cron, CI).")] = False,
    device: Annotated[str, typer.Option(
        help="cpu, cuda or cuda:N: where kernels are measured; only kernels built for this "
        "device's target are claimed.")] = "cpu",
    max_jobs: Annotated[int | None, typer.Option(
        min=1, help="Stop after judging this many kernels.")] = None,
    lease_seconds: Annotated[float, typer.Option(
        min=1, help="Claim lease; renewed while the gauntlet runs.")] = 120.0,
    wall_limit_s: Annotated[float, typer.Option(
        min=0.01, help="Wall-clock limit of one gauntlet, torch's import included.")] = 300.0,
    cpu_limit_s: Annotated[float | None, typer.Option(
        min=1, help="CPU-time limit of one gauntlet (RLIMIT_CPU). Default: twice the "
        "wall-clock limit.")] = None,
    memory_limit_mb: Annotated[float, typer.Option(
        min=1, help="Resident-memory limit of one gauntlet child, torch included.")] = 4096.0,
    rounds: Annotated[int, typer.Option(
        min=2, help="Timed rounds per metric; their spread is the reported CV%.")] = 5,
    round_seconds: Annotated[float, typer.Option(
        min=0.001, help="Timed work per round.")] = 0.1,
    poll_interval_s: Annotated[float, typer.Option(
        min=0.05, help="How often to look at Urza when no bus notice wakes the bench.")] = 5.0,
    grace_s: Annotated[float, typer.Option(
        min=0, help="On SIGINT/SIGTERM, how long the current gauntlet may still run before it "
        "is stopped and the claim released.")] = 30.0,
    worker_id: Annotated[str | None, typer.Option(
        help="This bench's name in claims and the audit log. Default: bench-HOST-PID.")] = None,
) -> None:
    """Characterize compiled kernels and sign the verdict (Urabrask, a daemon).

    Claims PENDING_BENCHMARKING kernels for this device, runs the gauntlet in a sandboxed
    child (load with signature and hash checks, forward/backward, shapes, finiteness, gradient
    flow, determinism, function preservation; then latency, memory, drift, FLOPs), tags each by
    percentile against the kernels measured on the same target, scores its risk, and applies a
    bench-signed report: VALIDATED, or REJECTED with the reason. A kernel whose blobs the
    artifact store cannot give back intact (missing, or failing their sha256) is not judged: it
    stays PENDING_BENCHMARKING, and the bench exits 3 naming the blob once it stops. Progress
    goes to stderr, one line per kernel; the summary to stdout. SIGINT/SIGTERM finish or release
    the current claim.

    Example: esper bench --once --device cpu
    """
    from dataclasses import replace

    from esper.errors import BadInputError, IntegrityError
    from pipelines.tezzeret.sandbox import Limits
    from pipelines.urabrask.bench import BenchOptions, run_bench

    ectx = get_context(ctx)
    try:
        limits = Limits(wall_s=wall_limit_s, cpu_s=cpu_limit_s or 2 * wall_limit_s,
                        memory_mb=memory_limit_mb)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    options = BenchOptions(device=device, lease_seconds=lease_seconds, limits=limits,
                           poll_interval_s=poll_interval_s, max_jobs=max_jobs, grace_s=grace_s,
                           rounds=rounds, round_seconds=round_seconds)
    if worker_id is not None:
        options = replace(options, worker_id=worker_id)
    summary = run_bench(ectx.workspace.require(), ectx.redis_url, options, once=once,
                        progress=progress_printer())
    ectx.emit(summary.to_jsonable(), lambda: _render(summary))
    if summary.damaged:  # left PENDING_BENCHMARKING: a verdict on damaged bytes is no verdict
        (kernel_id, damage), more = next(iter(summary.damaged.items())), len(summary.damaged) - 1
        raise IntegrityError(
            f"the artifact store is damaged: kernel {kernel_id} was not judged ({damage})"
            + (f", nor {more} more kernel(s)" if more else "")
            + "; restore it from a backup and run the bench again")
    if summary.sandbox_failure is not None:  # the limits given cannot run any gauntlet
        raise BadInputError(f"the bench stopped: {summary.sandbox_failure}")


def _render(summary) -> None:
    from commands._render import print_table

    damaged = f", {len(summary.damaged)} not judged (store damage)" if summary.damaged else ""
    out_console.print(f"bench {summary.worker_id}: {summary.validated} validated, "
                      f"{summary.rejected} rejected, {summary.released} released, "
                      f"{summary.retagged} re-tagged{damaged} in "
                      f"{summary.seconds:.1f} s (risk model: {summary.risk_model})",
                      highlight=False, soft_wrap=True)
    rows = [[j.kernel_id, "VALIDATED" if j.validated else "REJECTED",
             f"{j.latency_ms:.4g}" if j.latency_ms is not None else "-",
             f"{j.memory_mb:.4g}" if j.memory_mb is not None else "-",
             ", ".join(j.tags) if j.validated else (j.reason or "")]
            for j in summary.jobs]
    if rows:
        print_table("kernels", ["kernel", "verdict", "latency ms", "memory MB",
                                "tags / reason"], rows)
