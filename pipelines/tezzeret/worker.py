"""The compile child: the process `sandbox.py` starts for each job (or once, with --serve).

    python -m pipelines.tezzeret.worker JOB.json OUT_DIR [--cpu-limit-s S] [--parent-pid PID]
    python -m pipelines.tezzeret.worker --serve [--parent-pid PID]

One job: read the CompileJob JSON, `compile_job(job, OUT_DIR)` (it writes the artifact files,
then result.json last), exit 0. Any failure is one line on stderr and exit status 1.

--serve: a warm worker for the fast pipeline. It imports torch once, answers `{"ready": true}`,
then reads one request per line on stdin, `{"job": "<CompileJob JSON>", "out_dir": "...",
"cpu_s": S}`, and answers each with one line on stdout: `{"ok": true, "peak_rss_mb": M}` or
`{"ok": false, "error": "<one line>"}`. EOF on stdin ends it. Anything else the job prints goes
to stderr, so it cannot corrupt the replies.

Before anything heavy is imported the worker caps its own CPU time (RLIMIT_CPU: SIGXCPU ends it)
and, on Linux, asks to be killed if the forge dies (PR_SET_PDEATHSIG), so an orphaned compile
never runs on after a `kill -9` of the forge.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.tezzeret.worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("job", nargs="?", type=Path, help="the CompileJob JSON file")
    parser.add_argument("out_dir", nargs="?", type=Path, help="where the artifact files go")
    parser.add_argument("--serve", action="store_true", help="take jobs on stdin, one per line")
    parser.add_argument("--cpu-limit-s", type=float, default=None,
                        help="CPU-time limit of this process (RLIMIT_CPU), one job")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="die with this process (the forge)")
    args = parser.parse_args(argv)
    if args.serve == (args.job is not None) or (args.job is None) != (args.out_dir is None):
        parser.error("give JOB.json OUT_DIR, or --serve")

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no multi-GB core file
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    if args.serve:
        return _serve()
    if args.cpu_limit_s is not None:
        _cap_cpu(args.cpu_limit_s, hard=True)
    try:
        from pipelines.tezzeret.compile import CompileJob, compile_job

        job = CompileJob.from_json(args.job.read_text(encoding="utf-8"))
        compile_job(job, args.out_dir)
    except Exception as e:  # noqa: BLE001 - the parent wants one line, whatever failed
        print(_describe(e), file=sys.stderr, flush=True)
        return 1
    return 0


def _serve() -> int:
    # Replies go to the real stdout; everything else written to fd 1 (a print in the job, a
    # library's banner) is sent to stderr instead.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        import torch  # noqa: F401 - the point of a warm worker: every job finds torch imported

        from pipelines.tezzeret.compile import CompileJob, compile_job
    except Exception as e:  # noqa: BLE001
        print(_describe(e), file=sys.stderr, flush=True)
        return 1
    _reply(replies, {"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            _cap_cpu(float(request["cpu_s"]), hard=False)
            _reset_peak_rss()
            job = CompileJob.from_json(request["job"])
            compile_job(job, Path(request["out_dir"]))
        except Exception as e:  # noqa: BLE001 - one failed job, the worker stays
            _reply(replies, {"ok": False, "error": _describe(e)})
            continue
        _reply(replies, {"ok": True, "peak_rss_mb": _peak_rss_mb()})
    return 0


def _reply(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def _cap_cpu(seconds: float, *, hard: bool) -> None:
    """Allow `seconds` more CPU time from now. RLIMIT_CPU counts from the process's start, so the
    soft limit is what was used so far plus the allowance; the kernel sends SIGXCPU past it.
    `hard`: also set the hard limit a little above (SIGKILL there), which can never be raised
    again: one-job processes only."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + math.ceil(seconds)
    _, current_hard = resource.getrlimit(resource.RLIMIT_CPU)
    unlimited = current_hard == resource.RLIM_INFINITY
    new_hard = current_hard
    if hard:
        new_hard = soft + 2 if unlimited else min(soft + 2, current_hard)
    if not unlimited:
        soft = min(soft, current_hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, new_hard))


def _reset_peak_rss() -> None:
    """Make VmHWM start again from the current resident set (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _describe(error: BaseException) -> str:
    from esper.errors import EsperError

    text = str(error) if isinstance(error, EsperError) else f"{type(error).__name__}: {error}"
    line = " ".join(text.split())
    return line if len(line) <= 500 else line[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
