"""Each compile runs in a child process with wall-clock, CPU-time and memory limits (DESIGN.md
section 8, HLD J.7): a crash, a hang or a runaway allocation ends that one job, never the forge.

Two ways to run a job, one protocol of files:

- `run_sandboxed(job, out_dir, limits)`: a fresh `python -m pipelines.tezzeret.worker JOB.json
  OUT_DIR` per job. Every compiled pipeline (`standard`, `aggressive`) runs this way: nothing of
  one torch.compile (dynamo caches, inductor state) can leak into the next.
- `WarmWorker`: one long-lived `python -m pipelines.tezzeret.worker --serve` that takes jobs one
  JSON line at a time, for the `fast` pipeline. Importing torch costs ~2 s of the ~2.1 s a fresh
  child spends on a fast job (2 cores, torch 2.13 CPU), so a fresh child per job cannot reach
  the target of more than one fast artifact per second; the warm worker is still a separate
  process under the same three limits, and it is replaced after any failure.

Nothing is pickled across the boundary: the job goes in as JSON, the result comes back as
OUT_DIR/result.json plus the files it names (written by `compile_job`, result.json last).

The limits, and why each is enforced where it is:

- wall clock: the parent's clock; past it the child's whole process group (it is a session
  leader, so inductor's compile workers are in its group) gets SIGKILL;
- CPU time: RLIMIT_CPU, set by the child on itself before it imports anything heavy (in a warm
  worker, re-armed before each job as "used so far + this job's allowance"); the kernel sends
  SIGXCPU, whose default action ends the process;
- memory: the parent samples the resident set (VmRSS, from /proc/<pid>/stat) of the child and
  all its descendants every 50 ms and kills the group past the limit. Not RLIMIT_AS: torch and
  CUDA reserve far more address space than they ever touch (a CUDA context maps tens of GB), so
  an address-space cap small enough to matter breaks healthy jobs. The cost of sampling: an
  allocation spike shorter than 50 ms can overshoot before it is seen (the system's OOM killer
  remains the backstop, and its SIGKILL is reported as such). The limit covers the whole child,
  the Python interpreter and torch included (~270 MB on CPU before any work).

A fresh child's start (Python, then torch: ~2 s of wall and CPU time on 2 cores) counts against
its job's wall-clock and CPU limits; a warm worker's start has its own bound and counts for no job.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Self

if TYPE_CHECKING:
    from pipelines.tezzeret.compile import CompileJob, CompileResult

log = logging.getLogger("esper.tezzeret")

WORKER_MODULE = "pipelines.tezzeret.worker"
SAMPLE_INTERVAL_S = 0.05
# A warm worker starts by importing torch and the compile module; this bounds that start.
WORKER_START_TIMEOUT_S = 120.0
# Replace a warm worker after this many jobs, or when its resident set after a job has grown,
# since it started, by more than 256 MB and half the room the memory limit left it: memory the
# allocator keeps from past jobs must not eat the next job's room.
WARM_MAX_JOBS = 1000
WARM_RSS_GROWTH_MB = 256.0
WARM_RSS_GROWTH_FRACTION = 0.5
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one compile job may use. `memory_mb` is the resident set of the child and its
    descendants, the interpreter and torch included."""

    wall_s: float
    cpu_s: float
    memory_mb: float

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"limit {name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class SandboxOutcome:
    """How one job ended. `reason` is one line when `ok` is False. `stopped`: the caller stopped
    it (`should_stop`, or `heartbeat` said the claim was lost), which says nothing of the job."""

    ok: bool
    reason: str | None
    result: CompileResult | None
    seconds: float
    peak_rss_mb: float
    stopped: bool = False


# Control from the caller: `heartbeat` is called about every `heartbeat_s` (renew a lease; False
# means the claim was lost and the job is stopped), `should_stop` on every sample (a signal asked
# the forge to stop: the job is stopped at once).
Heartbeat = Callable[[], bool]
ShouldStop = Callable[[], bool]


@dataclass
class _Watch:
    """The parent's side of one running job: clock, limits, samples."""

    limits: Limits
    heartbeat: Heartbeat | None
    heartbeat_s: float
    should_stop: ShouldStop | None
    started: float = 0.0
    next_beat: float = 0.0
    peak_mb: float = 0.0
    stopped: bool = False  # by the caller, not by a limit

    def start(self) -> None:
        self.started = time.monotonic()
        self.next_beat = self.started + self.heartbeat_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self, pid: int) -> str | None:
        """One sample: None while the job may go on, else why it must be stopped."""
        rss = group_rss_mb(pid)
        self.peak_mb = max(self.peak_mb, rss)
        if rss > self.limits.memory_mb:
            return (f"memory limit of {self.limits.memory_mb:g} MB exceeded (resident set "
                    f"{rss:.0f} MB)")
        if self.elapsed() > self.limits.wall_s:
            return f"wall-clock limit of {self.limits.wall_s:g} s exceeded"
        if self.should_stop is not None and self.should_stop():
            self.stopped = True
            return "stopped: the forge is shutting down"
        now = time.monotonic()
        if self.heartbeat is not None and now >= self.next_beat:
            self.next_beat = now + self.heartbeat_s
            if not self.heartbeat():
                self.stopped = True
                return "stopped: the forge lost its claim on the blueprint"
        return None


# One fresh process per job -----------------------------------------------------------------------

@dataclass(frozen=True)
class ChildRun:
    """How a sandboxed child ended: `failure` is None when it exited 0 within its limits (a
    memory peak between two samples, which the kernel's own count caught, is a failure too)."""

    failure: str | None
    seconds: float
    peak_rss_mb: float
    stopped: bool = False  # by the caller (a signal, a lost claim), not by a limit


def make_scratch(prefix: str) -> Path:
    """A new scratch folder, `<tmp>/<prefix><pid>-XXXX`, for one daemon's job files, after
    removing the folders that dead daemons of its kind (`prefix`) left behind: one killed with
    kill -9 never removes its own."""
    sweep_dead_scratch(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def sweep_dead_scratch(prefix: str) -> None:
    """Remove the `<tmp>/<prefix><pid>-*` folders whose process is gone."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{prefix}*-*"):
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def run_child(module_args: list[str], limits: Limits, scratch: Path, *,
              heartbeat: Heartbeat | None = None, heartbeat_s: float = 10.0,
              should_stop: ShouldStop | None = None) -> ChildRun:
    """Run `python -m <module_args...>` as a fresh child under `limits`: its own process group
    (killed whole when it ends or must stop), a CPU limit the child sets on itself from
    `--cpu-limit-s`, resident memory and the wall clock watched from here. Its output goes to
    `scratch/stderr.log`; the forge's compiles and the bench's gauntlets both run this way."""
    watch = _Watch(limits, heartbeat, heartbeat_s, should_stop)
    stderr_path = Path(scratch) / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        watch.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", *module_args, "--cpu-limit-s", f"{limits.cpu_s:g}",
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            start_new_session=True, env=_child_env())
        stop_reason, returncode, child_peak = _supervise(proc, watch)
    seconds, peak = watch.elapsed(), max(watch.peak_mb, child_peak)
    if stop_reason is not None:
        return ChildRun(stop_reason, seconds, peak, stopped=watch.stopped)
    if returncode != 0:
        return ChildRun(_exit_reason(returncode, limits, _last_line(stderr_path)), seconds, peak)
    if peak > limits.memory_mb:  # a peak between two samples: the kernel's own count caught it
        return ChildRun(_peak_over_limit(limits, peak), seconds, peak)
    return ChildRun(None, seconds, peak)


def _peak_over_limit(limits: Limits, peak: float) -> str:
    return f"memory limit of {limits.memory_mb:g} MB exceeded (peak resident set {peak:.0f} MB)"


def run_sandboxed(job: CompileJob, out_dir: Path, limits: Limits, *,
                  heartbeat: Heartbeat | None = None, heartbeat_s: float = 10.0,
                  should_stop: ShouldStop | None = None) -> SandboxOutcome:
    """Compile `job` in a fresh child process under `limits`; its files land in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".sandbox-") as scratch:
        job_path = Path(scratch) / "job.json"
        job_path.write_text(job.to_json(), encoding="utf-8")
        run = run_child([WORKER_MODULE, str(job_path), str(out_dir)], limits, Path(scratch),
                        heartbeat=heartbeat, heartbeat_s=heartbeat_s, should_stop=should_stop)
    if run.failure is not None:
        return SandboxOutcome(False, run.failure, None, run.seconds, run.peak_rss_mb,
                              stopped=run.stopped)
    return _read_result(out_dir, run.seconds, run.peak_rss_mb)


def _supervise(proc: subprocess.Popen, watch: _Watch) -> tuple[str | None, int, float]:
    """Sample until the child exits or must be stopped. Returns (why we stopped it, exit code,
    the child's own peak RSS in MB as the kernel kept it, which 50 ms samples can miss)."""
    stop_reason = None
    try:
        while not _has_exited(proc.pid):
            stop_reason = watch.check(proc.pid)
            if stop_reason is not None:
                break
            time.sleep(SAMPLE_INTERVAL_S)
    finally:
        # Whatever happened (an exception here included), nothing of the job outlives this call:
        # the child leads its own process group, and inductor's compile workers live in it. The
        # group is killed before the leader is reaped, so its id cannot have been reused.
        kill_group(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return stop_reason, proc.returncode, usage.ru_maxrss / 1024  # KiB on Linux


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (WNOWAIT)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


# One long-lived process for many jobs ------------------------------------------------------------

class WarmWorker:
    """A worker process that imports torch once and runs jobs one after another.

    Used from one thread. A job that fails by a limit, a crash or a broken reply costs the
    process: it is killed and the next job starts a new one. `close()` ends it.
    """

    def __init__(self, *, scratch_dir: Path, max_jobs: int = WARM_MAX_JOBS):
        self._scratch = Path(scratch_dir)
        self._max_jobs = max_jobs
        self._proc: subprocess.Popen | None = None
        self._stderr: BinaryIO | None = None
        self._stderr_path = self._scratch / "warm-worker.stderr.log"
        self._buffer = b""
        self._jobs = 0
        self._ready = False
        self._ready_rss_mb = 0.0  # resident set once torch is imported, before any job
        self.starts = 0  # processes started so far (tests and logs read it)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the process now (it then imports torch while the caller does other work)."""
        if self._proc is not None:
            return
        self._scratch.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self._stderr_path, "ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, "--serve", "--parent-pid", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            start_new_session=True, env=_child_env())
        self._buffer = b""
        self._jobs = 0
        self._ready = False
        self.starts += 1

    def run(self, job: CompileJob, out_dir: Path, limits: Limits, *,
            heartbeat: Heartbeat | None = None, heartbeat_s: float = 10.0,
            should_stop: ShouldStop | None = None) -> SandboxOutcome:
        """Compile `job` in the warm process under `limits`; its files land in `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.start()
        proc = self._proc
        assert proc is not None and self._stderr is not None
        if not self._ready:
            # The start (importing torch) is not the job's time: it has its own bound.
            start_watch = _Watch(Limits(WORKER_START_TIMEOUT_S, WORKER_START_TIMEOUT_S,
                                        limits.memory_mb), heartbeat, heartbeat_s, should_stop)
            start_watch.start()
            reply, why = self._read_reply(start_watch)
            if reply is None or not reply.get("ready"):
                reason = why or _exit_reason(proc.returncode, None, self._stderr_tail(0))
                self._discard()
                return SandboxOutcome(False, f"the warm worker did not start: {reason}", None,
                                      start_watch.elapsed(), start_watch.peak_mb,
                                      stopped=start_watch.stopped)
            self._ready = True
            self._ready_rss_mb = group_rss_mb(proc.pid)
        self._stderr.flush()
        stderr_offset = self._stderr_path.stat().st_size
        request = {"job": job.to_json(), "out_dir": str(out_dir), "cpu_s": limits.cpu_s}
        watch = _Watch(limits, heartbeat, heartbeat_s, should_stop)
        watch.start()
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: the read below reports how
        reply, why = self._read_reply(watch)
        seconds = watch.elapsed()
        peak = max(watch.peak_mb, float(reply.get("peak_rss_mb", 0.0)) if reply else 0.0)
        if reply is None:
            returncode = proc.returncode
            self._discard()
            reason = why or _exit_reason(returncode, limits, self._stderr_tail(stderr_offset))
            return SandboxOutcome(False, reason, None, seconds, peak, stopped=watch.stopped)
        self._jobs += 1
        grown = group_rss_mb(proc.pid) - self._ready_rss_mb
        allowed = max(WARM_RSS_GROWTH_MB,
                      WARM_RSS_GROWTH_FRACTION * (limits.memory_mb - self._ready_rss_mb))
        if self._jobs >= self._max_jobs or grown > allowed:
            self.close()
        if not reply.get("ok"):
            return SandboxOutcome(False, one_line(str(reply.get("error") or "compile failed")),
                                  None, seconds, peak)
        if peak > limits.memory_mb:  # a peak between two samples: the child's own count caught it
            return SandboxOutcome(False, _peak_over_limit(limits, peak), None, seconds, peak)
        return _read_result(out_dir, seconds, peak)

    def close(self) -> None:
        """End the process: EOF on its stdin asks it to exit; a short wait, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        self._discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals ------------------------------------------------------------------------------
    def _read_reply(self, watch: _Watch) -> tuple[dict | None, str | None]:
        """The next JSON line from the worker, sampling limits while waiting. (None, why) when
        we stopped it, (None, None) when it died or answered garbage."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                why = watch.check(proc.pid)
                if why is not None:
                    self._discard()
                    return None, why
                if not selector.select(SAMPLE_INTERVAL_S):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:  # EOF: the process is gone
                    kill_group(proc.pid)
                    proc.wait()
                    return None, None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            return None, f"the warm worker answered something that is not JSON: {line[:120]!r}"
        return (reply, None) if isinstance(reply, dict) else (None, "malformed worker reply")

    def _discard(self) -> None:
        """Kill the process group now and forget the process."""
        proc = self._proc
        if proc is None:
            return
        kill_group(proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("tezzeret: warm worker %d did not exit after SIGKILL", proc.pid)
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._proc = None

    def _stderr_tail(self, offset: int) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                f.seek(offset)
                return _last_nonempty(f.read()[-8192:])
        except OSError:
            return ""


# Shared helpers ----------------------------------------------------------------------------------

def group_rss_mb(pid: int) -> float:
    """Resident set (MB) of `pid` and all its descendants; 0 where /proc cannot tell."""
    total_pages = 0
    seen: set[int] = set()
    stack = [pid]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/stat", "rb") as f:
                stat = f.read()
            # Fields after the command name (which may hold spaces and parentheses).
            fields = stat[stat.rindex(b")") + 2:].split()
            total_pages += int(fields[21])  # rss, in pages
            for task in os.scandir(f"/proc/{current}/task"):
                with open(f"{task.path}/children", "rb") as f:
                    stack.extend(int(child) for child in f.read().split())
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or no /proc: nothing to count
    return total_pages * _PAGE_BYTES / _MB


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group `pgid` (the sandboxed child is its leader)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_result(out_dir: Path, seconds: float, peak: float) -> SandboxOutcome:
    from pipelines.tezzeret.compile import CompileResult

    result_path = out_dir / "result.json"
    try:
        result = CompileResult.from_json(result_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return SandboxOutcome(False, "the worker exited 0 but wrote no result.json", None,
                              seconds, peak)
    except Exception as e:  # noqa: BLE001 - any unreadable result fails this job only
        return SandboxOutcome(False, one_line(f"unreadable result.json: {e}"), None, seconds,
                              peak)
    return SandboxOutcome(True, None, result, seconds, peak)


def _exit_reason(returncode: int | None, limits: Limits | None, stderr_tail: str) -> str:
    """One line for a child that exited on its own: by a signal, or with an error."""
    if returncode is not None and returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if signum == signal.SIGXCPU and limits is not None:
            return f"CPU-time limit of {limits.cpu_s:g} s exceeded"
        if signum == signal.SIGKILL:
            return "killed by SIGKILL from outside the forge (the system's out-of-memory killer?)"
        return one_line(f"crashed with {name}" + (f": {stderr_tail}" if stderr_tail else ""))
    if stderr_tail:
        return one_line(stderr_tail)
    return f"the worker exited with status {returncode}"


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 8192))
            return _last_nonempty(f.read())
    except OSError:
        return ""


def _last_nonempty(data: bytes) -> str:
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()
    return ""


def one_line(text: str, limit: int = 500) -> str:
    """`text` as one line of at most `limit` characters (for failure reasons)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
