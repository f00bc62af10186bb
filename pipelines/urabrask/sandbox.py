"""Run one gauntlet in a fresh child process under the forge's limits (pipelines/tezzeret/
sandbox.py: wall clock by the parent's clock, CPU time by RLIMIT_CPU, resident memory of the
whole process group sampled every 50 ms, the group SIGKILLed on any breach or error).

A fresh process per kernel, never a warm one: a kernel that corrupts its process must not
touch the next measurement, and each peak is measured from a clean interpreter. The cost is
torch's import (~2 s on 2 CPU cores) per kernel.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.tezzeret.sandbox import (
    Heartbeat,
    Limits,
    ShouldStop,
    one_line,
    run_child,
)
from pipelines.urabrask.gauntlet import GauntletJob, GauntletResult
from pipelines.urabrask.worker import RESULT_FILE

WORKER_MODULE = "pipelines.urabrask.worker"


@dataclass(frozen=True)
class GauntletOutcome:
    """How the child ended. `result` is set when it wrote one (passed or failed a check);
    otherwise `reason` says why it did not (a limit, a crash). `stopped`: by the caller."""

    result: GauntletResult | None
    reason: str | None
    seconds: float
    peak_rss_mb: float
    stopped: bool = False


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
