"""Run one gauntlet in a fresh child process under the forge's limits (pipelines/tezzeret/
sandbox.py: wall clock by the parent's clock, CPU time by RLIMIT_CPU, resident memory of the
whole process group sampled every 50 ms, the group SIGKILLed on any breach or error).

A fresh process per kernel, never a warm one: a kernel that corrupts its process must not
touch the next measurement, and each peak is measured from a clean interpreter. The cost is
torch's import (~2 s on 2 CPU cores) per kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.tezzeret.sandbox import (
    Heartbeat,
    Limits,
    ShouldStop,
    _child_env,
    _exit_reason,
    _last_line,
    _one_line,
    _supervise,
    _Watch,
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
    watch = _Watch(limits, heartbeat, heartbeat_s, should_stop)
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="gauntlet-") as scratch:
        scratch = Path(scratch)
        job_path = scratch / "job.json"
        job_path.write_text(json.dumps(job.to_jsonable()), encoding="utf-8")
        out_dir = scratch / "out"
        stderr_path = scratch / "stderr.log"
        with open(stderr_path, "wb") as stderr:
            watch.start()
            proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(workspace_root), str(job_path),
                 str(out_dir), "--cpu-limit-s", f"{limits.cpu_s:g}",
                 "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True, env=_child_env())
            stop_reason, returncode, child_peak = _supervise(proc, watch)
        seconds = watch.elapsed()
        peak = max(watch.peak_mb, child_peak)
        if stop_reason is not None:
            return GauntletOutcome(None, stop_reason, seconds, peak, stopped=watch.stopped)
        if returncode != 0:
            return GauntletOutcome(None, _exit_reason(returncode, limits, _last_line(stderr_path)),
                                   seconds, peak)
        if peak > limits.memory_mb:  # a spike shorter than a sample: the kernel's count caught it
            return GauntletOutcome(None, f"memory limit of {limits.memory_mb:g} MB exceeded "
                                         f"(peak resident set {peak:.0f} MB)", seconds, peak)
        try:
            data = json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8"))
            result = GauntletResult.from_jsonable(data)
        except FileNotFoundError:
            return GauntletOutcome(None, "the gauntlet child exited 0 but wrote no result",
                                   seconds, peak)
        except (ValueError, TypeError) as e:
            return GauntletOutcome(None, _one_line(f"unreadable gauntlet result: {e}"), seconds,
                                   peak)
    return GauntletOutcome(result, None, seconds, peak)
