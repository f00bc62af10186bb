"""Run one gauntlet in a fresh child process under the forge's limits (pipelines/tezzeret/
sandbox.py: wall clock by the parent's clock, CPU time by RLIMIT_CPU, resident memory of the
whole process group sampled every 50 ms, the group SIGKILLed on any breach or error).

A fresh process per kernel, never a warm one: a kernel that corrupts its process must not
touch the next measurement, and each peak is measured from a clean interpreter. The cost is
torch's import (~2 s on 2 CPU cores) per kernel.

That start counts against the kernel's limits, so a limit below what Python and torch need
(`--memory-limit-mb 1`, `--wall-limit-s 0.5`) kills every child before it reaches its kernel.
Such a failure is the bench's, not the kernel's: as the forge reports a warm worker that never
answered `{"ready": true}` ("the warm worker did not start") without blaming the blueprint, a
child that never wrote worker.READY_FILE, or whose start alone already exceeded the memory limit
(a peak the 50 ms samples saw only later), comes back with `reached_kernel=False`, and the bench
releases the kernel unjudged.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.tezzeret.sandbox import (
    ChildRun,
    Heartbeat,
    Limits,
    ShouldStop,
    one_line,
    run_child,
)
from pipelines.urabrask.gauntlet import GauntletJob, GauntletResult
from pipelines.urabrask.worker import READY_FILE, RESULT_FILE

WORKER_MODULE = "pipelines.urabrask.worker"


@dataclass(frozen=True)
class GauntletOutcome:
    """How the child ended. `result` is set when it wrote one (passed or failed a check);
    otherwise `reason` says why it did not (a limit, a crash). `stopped`: by the caller.
    `reached_kernel` is False when the child failed before it loaded the kernel (start-up:
    Python, torch, the catalog): then `reason` says so, and nothing is known of the kernel."""

    result: GauntletResult | None
    reason: str | None
    seconds: float
    peak_rss_mb: float
    stopped: bool = False
    reached_kernel: bool = True


def run_gauntlet_sandboxed(workspace_root: Path, job: GauntletJob, limits: Limits, *,
                           heartbeat: Heartbeat | None = None, heartbeat_s: float = 10.0,
                           should_stop: ShouldStop | None = None,
                           scratch_dir: Path | None = None) -> GauntletOutcome:
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="gauntlet-") as scratch:
        scratch = Path(scratch)
        job_path = scratch / "job.json"
        job_path.write_text(json.dumps(job.to_jsonable()), encoding="utf-8")
        out_dir = scratch / "out"
        run = run_child([WORKER_MODULE, str(workspace_root), str(job_path), str(out_dir)],
                        limits, scratch, heartbeat=heartbeat, heartbeat_s=heartbeat_s,
                        should_stop=should_stop)
        seconds, peak = run.seconds, run.peak_rss_mb
        if run.failure is not None:
            if not run.stopped and not _reached_kernel(out_dir, limits):
                return GauntletOutcome(None, _startup_failure(run, limits), seconds, peak,
                                       reached_kernel=False)
            return GauntletOutcome(None, run.failure, seconds, peak, stopped=run.stopped)
        try:
            data = json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8"))
            result = GauntletResult.from_jsonable(data)
        except FileNotFoundError:
            return GauntletOutcome(None, "the gauntlet child exited 0 but wrote no result",
                                   seconds, peak)
        except (ValueError, TypeError) as e:
            return GauntletOutcome(None, one_line(f"unreadable gauntlet result: {e}"), seconds,
                                   peak)
    return GauntletOutcome(result, None, seconds, peak)


def _reached_kernel(out_dir: Path, limits: Limits) -> bool:
    """Whether the child got as far as its kernel: it wrote READY_FILE just before loading it,
    with a start-up peak within the memory limit."""
    try:
        ready = json.loads((out_dir / READY_FILE).read_text(encoding="utf-8"))
        return float(ready["peak_rss_mb"]) <= limits.memory_mb
    except (OSError, ValueError, TypeError, KeyError):
        return False  # not written (it is written atomically: never half)


def _startup_failure(run: ChildRun, limits: Limits) -> str:
    """One line for a child that failed before it loaded its kernel."""
    over_limit = (run.peak_rss_mb > limits.memory_mb or run.seconds > limits.wall_s
                  or run.failure.startswith("CPU-time limit"))  # SIGXCPU, as sandbox.py says it
    if over_limit:
        return (f"{run.failure} before the gauntlet child loaded the kernel: the limit is too "
                f"small for the sandbox to start (Python and torch)")
    return f"the gauntlet child failed before it loaded the kernel: {run.failure}"
