"""Tezzeret's loop: claim a blueprint, check it, compile what it lacks, register, announce.

    forge = Forge(workspace, urza, bus, ForgeOptions(devices=("cpu",)))
    summary = forge.run(once=True)

One blueprint at a time (DESIGN.md section 8, HLD 7.2.1 and J.3-J.7):

1. claim: `claim_next_blueprint` takes the oldest waiting blueprint in one statement, so two
   forges never hold the same one; a claim is a lease, renewed while the forge works on it;
2. check: the IR is parsed and statically validated ("jank check"); a failure sets the blueprint
   INVALID with the rule and node, and `compilation.failed` (stage "validation") says so;
3. compile: each missing kernel (plan.py) runs in a sandboxed child (sandbox.py); a built one is
   sealed (signed manifest, files in the store), registered PENDING_BENCHMARKING and announced on
   `compilation.kernel.ready`; a failed one is announced on `compilation.failed` (stage
   "compile"), recorded in the audit log, and the other jobs go on;
4. finish: COMPILED, even with nothing to build yet (an interface registered later is caught up
   by the idle scan below).

When nothing waits, the forge looks for work itself: COMPILED blueprints that lack kernels for
interfaces registered since, then idle work (high `tamiyo_interest`, older toolchains) within the
daily compile budget; it queues one by COMPILED -> COMPILING and claims it like any other.
Otherwise it sleeps until `compilation.blueprint.submitted` wakes it (consumer group
"tezzeret") or the poll interval passes; a bus that cannot be reached only costs the wake-up.

SIGINT/SIGTERM: the current job may finish within the grace period (a second signal ends it at
once), then the claim is released (back to UNVALIDATED, kernels built so far kept) and `run`
returns.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from esper.blueprints import BlueprintIR, BlueprintValidationError, load_ir, validate
from esper.contracts import (
    Blueprint,
    BlueprintStatus,
    CompilationFailed,
    CompilationPipeline,
    KernelInterface,
    KernelReady,
    Topic,
)
from esper.errors import BadInputError, EsperError, IntegrityError
from esper.oona import Oona
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines import daemon_bus
from pipelines.daemon_bus import DaemonBus
from pipelines.stopping import GracefulStop
from pipelines.tezzeret import ledger
from pipelines.tezzeret.plan import (
    DevicePlan,
    PlannedJob,
    Why,
    missing_jobs,
    wanted_jobs,
)
from pipelines.tezzeret.sandbox import (
    Limits,
    SandboxOutcome,
    WarmWorker,
    make_scratch,
    run_sandboxed,
)

log = logging.getLogger("esper.tezzeret")

CONSUMER_GROUP = "tezzeret"
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# Job files live in <tmp>/esper-forge-<pid>-XXXX/ while the forge runs.
_SCRATCH_PREFIX = "esper-forge-"


def _default_memory_mb() -> float:
    """Half the machine's memory, at most 16 GB: room for a big compile, none to drown the host."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        return 8192.0
    return float(min(16384, max(1024, physical // 2)))


def default_limits() -> dict[CompilationPipeline, Limits]:
    """Per pipeline (HLD J.4 targets: fast < 60 s, standard < 5 min; aggressive autotunes)."""
    memory = _default_memory_mb()
    return {
        CompilationPipeline.FAST: Limits(wall_s=120, cpu_s=240, memory_mb=memory),
        CompilationPipeline.STANDARD: Limits(wall_s=1800, cpu_s=3600, memory_mb=memory),
        CompilationPipeline.AGGRESSIVE: Limits(wall_s=7200, cpu_s=14400, memory_mb=memory),
    }


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "host"
    return f"forge-{host}-{os.getpid()}"


@dataclass(frozen=True)
class ForgeOptions:
    """How a forge works. The defaults are `esper forge`'s."""

    worker_id: str = field(default_factory=default_worker_id)
    devices: tuple[str, ...] = ("cpu",)
    # None: fast on every device, and standard too on CUDA devices.
    pipelines: tuple[CompilationPipeline, ...] | None = None
    dtypes: tuple[str, ...] = ("float32",)  # for `interfaces`; registered ones carry their own
    interfaces: tuple[KernelInterface, ...] = ()
    lease_seconds: float = 120.0
    limits: Mapping[CompilationPipeline, Limits] = field(default_factory=default_limits)
    poll_interval_s: float = 5.0
    max_jobs: int | None = None  # compile jobs (built or failed) before the forge stops
    warm_fast: bool = True  # fast jobs in a long-lived worker process (see sandbox.py)
    grace_s: float = 10.0  # on SIGINT/SIGTERM, how long the current job may still take
    idle_work: bool = True
    interest_threshold: float = 1.0
    interest_pipeline: CompilationPipeline = CompilationPipeline.AGGRESSIVE
    daily_compile_budget: int = 500  # idle work stops once the workspace compiled this many today
    max_attempts: int = 2  # a job that failed this often is left alone until the toolchain changes

    def __post_init__(self) -> None:
        if not self.devices:
            raise BadInputError("the forge needs at least one device")
        for device in self.devices:
            if not _DEVICE.match(device):
                raise BadInputError(f"bad device {device!r}: use cpu, cuda or cuda:N")
        if len(set(self.devices)) != len(self.devices):
            raise BadInputError(f"a device is given twice: {', '.join(self.devices)}")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise BadInputError(f"unknown dtype {dtype!r} (expected one of: "
                                    f"{', '.join(DTYPES)})")
        if self.pipelines is not None and not self.pipelines:
            raise BadInputError("--pipelines names no pipeline")
        for name in ("lease_seconds", "poll_interval_s"):
            if not getattr(self, name) > 0:
                raise BadInputError(f"{name} must be positive")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise BadInputError("--max-jobs must be at least 1")
        if self.grace_s < 0 or self.daily_compile_budget < 0 or self.max_attempts < 1:
            raise BadInputError("grace, budget and attempts must not be negative")
        missing = [p.value for p in CompilationPipeline if p not in self.limits]
        if missing:
            raise BadInputError(f"no limits for pipeline(s) {', '.join(missing)}")

    def pipelines_for(self, device: str) -> tuple[CompilationPipeline, ...]:
        if self.pipelines is not None:
            return self.pipelines
        if device.startswith("cuda"):
            return (CompilationPipeline.FAST, CompilationPipeline.STANDARD)
        return (CompilationPipeline.FAST,)

    def with_limits(self, *, wall_s: float | None = None, cpu_s: float | None = None,
                    memory_mb: float | None = None) -> ForgeOptions:
        """The same options with these limits for every pipeline (None keeps each default)."""
        changes = {k: v for k, v in (("wall_s", wall_s), ("cpu_s", cpu_s),
                                     ("memory_mb", memory_mb)) if v is not None}
        try:
            limits = {p: replace(lim, **changes) for p, lim in self.limits.items()}
        except ValueError as e:
            raise BadInputError(str(e)) from None
        return replace(self, limits=limits)


@dataclass(frozen=True)
class JobReport:
    """One compile job, as the progress line and the summary tell it."""

    blueprint_id: str
    blueprint_name: str
    job: PlannedJob
    ok: bool
    reason: str | None
    seconds: float
    peak_rss_mb: float

    def line(self) -> str:
        head = f"{self.blueprint_id[:12]} {self.blueprint_name} {self.job.describe()}"
        if self.ok:
            return (f"{head} -> {self.job.kernel_id} ({self.seconds:.2f} s, "
                    f"{self.peak_rss_mb:.0f} MB)")
        return f"{head} FAILED after {self.seconds:.2f} s: {self.reason}"

    def to_jsonable(self) -> dict[str, Any]:
        return {"blueprint_id": self.blueprint_id, "blueprint": self.blueprint_name,
                "kernel_id": self.job.kernel_id, "interface": str(self.job.interface),
                "target": self.job.target, "dtype": self.job.dtype,
                "pipeline": self.job.pipeline.value, "why": self.job.why.value, "ok": self.ok,
                "reason": self.reason, "seconds": round(self.seconds, 4),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}


@dataclass
class PipelineTally:
    built: int = 0
    failed: int = 0
    seconds: float = 0.0  # in the sandbox, built and failed jobs


@dataclass
class ForgeSummary:
    """What one `run` did."""

    worker_id: str
    blueprints: int = 0  # claims worked on
    compiled: int = 0  # blueprints finished COMPILED
    invalid: int = 0  # blueprints found INVALID
    released: int = 0  # claims given back unfinished (signal, --max-jobs)
    queued: int = 0  # COMPILED blueprints this forge queued again (catch-up or idle work)
    built: list[str] = field(default_factory=list)
    failures: list[JobReport] = field(default_factory=list)
    pipelines: dict[str, PipelineTally] = field(default_factory=dict)
    stopped_by_signal: bool = False
    seconds: float = 0.0

    @property
    def jobs(self) -> int:
        return len(self.built) + len(self.failures)

    def count(self, report: JobReport) -> None:
        tally = self.pipelines.setdefault(report.job.pipeline.value, PipelineTally())
        tally.seconds += report.seconds
        if report.ok:
            tally.built += 1
            self.built.append(report.job.kernel_id)
        else:
            tally.failed += 1
            self.failures.append(report)

    def to_jsonable(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "blueprints": self.blueprints,
                "compiled": self.compiled, "invalid": self.invalid, "released": self.released,
                "queued": self.queued, "jobs": self.jobs, "built": list(self.built),
                "failed": [f.to_jsonable() for f in self.failures],
                "pipelines": {name: {"built": t.built, "failed": t.failed,
                                     "seconds": round(t.seconds, 3)}
                              for name, t in sorted(self.pipelines.items())},
                "stopped_by_signal": self.stopped_by_signal,
                "seconds": round(self.seconds, 3)}


class _Stop(Exception):
    """Leave the current blueprint: a signal, --max-jobs, or a lost claim."""


class Forge:
    """One forge worker on one workspace. Use it from one thread; `run` may be called once."""

    def __init__(self, workspace: Workspace, urza: Urza, bus: Oona | None, options: ForgeOptions,
                 *, progress: Callable[[str], None] | None = None):
        from pipelines.tezzeret.toolchain import current_toolchain, device_target

        self.workspace = workspace
        self.urza = urza
        self.options = options
        self.summary = ForgeSummary(worker_id=options.worker_id)
        self._progress = progress or log.info
        self._bus = DaemonBus(
            bus, group=CONSUMER_GROUP, wake_topic=Topic.COMPILATION_BLUEPRINT_SUBMITTED,
            worker_id=options.worker_id, log=log, poll_interval_s=options.poll_interval_s)
        self._devices = [DevicePlan(device=d, target=device_target(d),
                                    toolchain=current_toolchain(d),
                                    pipelines=options.pipelines_for(d))
                         for d in options.devices]
        self._forge_key = workspace.private_key("forge")
        self._attempted: set[str] = set()
        self._stop = GracefulStop(options.grace_s, log=log, job="job")
        self._scratch: Path | None = None
        self._warm: WarmWorker | None = None

    # The loop -------------------------------------------------------------------------------
    def run(self, once: bool) -> ForgeSummary:
        """Work until stopped (or, with `once`, until no work is left); never raises for one
        blueprint's or one job's failure."""
        started = time.monotonic()
        self._scratch = make_scratch(_SCRATCH_PREFIX)
        try:
            with self._stop.on_signals():
                self._loop(once)
        finally:
            self._bus.stopped()
            if self._warm is not None:
                self._warm.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
            self.summary.stopped_by_signal = self._stop.requested
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def request_stop(self) -> None:
        """Ask the loop to stop (what SIGINT/SIGTERM do). A second request ends the current job
        at once instead of after the grace period."""
        self._stop.request()

    def _loop(self, once: bool) -> None:
        if self.options.warm_fast and any(CompilationPipeline.FAST in d.pipelines
                                          for d in self._devices):
            self._warm = WarmWorker(scratch_dir=self._scratch / "warm")
        while not self._stopping() and not self._max_jobs_reached():
            blueprint = self.urza.claim_next_blueprint(self.options.worker_id,
                                                       self.options.lease_seconds)
            if blueprint is not None:
                self._work_on(blueprint)
                continue
            if self._queue_waiting_work():
                continue
            if once:
                break
            self._bus.wait(self._stopping)

    # One blueprint --------------------------------------------------------------------------
    def _work_on(self, blueprint: Blueprint) -> None:
        self.summary.blueprints += 1
        worker = self.options.worker_id
        try:
            checked = self._checked_ir(blueprint)
            if checked is None:
                return
            ir, ir_bytes = checked
            jobs = self._missing_for(blueprint)
            idle_left = self._idle_allowance() if any(j.why.idle for j in jobs) else 0
            misfits = {face for face in dict.fromkeys(j.interface for j in jobs)
                       if not self._fits(blueprint, ir, face, jobs)}
            for job in jobs:
                if job.interface in misfits:
                    continue
                if job.why.idle:
                    if idle_left <= 0:
                        continue
                    idle_left -= 1
                if self._stopping() or self._max_jobs_reached() or not self._renew(blueprint):
                    raise _Stop
                self._compile(blueprint, ir_bytes, job)
        except _Stop:
            if self.urza.release_blueprint(blueprint.id, worker):
                self.summary.released += 1
                self._progress(f"{blueprint.id[:12]} {blueprint.name}: claim released "
                               "(kernels built so far are kept)")
            return
        except BaseException:
            # The forge itself failed (a catalog it cannot write, a bug): give the claim back
            # now rather than when its lease runs out.
            try:
                self.urza.release_blueprint(blueprint.id, worker)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        try:
            self.urza.set_blueprint_status(blueprint.id, BlueprintStatus.COMPILED, actor=worker,
                                           worker=worker)
            self.summary.compiled += 1
        except EsperError as e:  # the lease expired and someone else took it over
            log.warning("tezzeret: %s: could not mark COMPILED: %s", blueprint.id[:12], e)

    def _checked_ir(self, blueprint: Blueprint) -> tuple[BlueprintIR, bytes] | None:
        """The blueprint's IR (parsed, and its stored bytes, which hash to the blueprint's id)
        if it passes the static check; else the blueprint is INVALID."""
        source = f"blueprint {blueprint.id[:12]} ({blueprint.name})"
        try:
            ir_bytes = self.urza.blueprint_ir(blueprint.id)
            ir = load_ir(ir_bytes, source=source)
            validate(ir, source=source)
            return ir, ir_bytes
        except BlueprintValidationError as e:
            failure = CompilationFailed(blueprint_id=blueprint.id, stage="validation",
                                        reason=str(e), rule=e.rule, node=e.node)
        except IntegrityError as e:  # the stored IR does not hash to the blueprint's id
            failure = CompilationFailed(blueprint_id=blueprint.id, stage="validation",
                                        reason=f"{source}: {e}")
        worker = self.options.worker_id
        try:
            self.urza.set_blueprint_status(blueprint.id, BlueprintStatus.INVALID, actor=worker,
                                           reason=failure.reason, worker=worker)
            self.summary.invalid += 1
        except EsperError as e:
            log.warning("tezzeret: %s: could not mark INVALID: %s", blueprint.id[:12], e)
        self._progress(f"{blueprint.id[:12]} {blueprint.name}: INVALID: {failure.reason}")
        self._bus.publish(Topic.COMPILATION_FAILED, failure)
        return None

    def _fits(self, blueprint: Blueprint, ir: BlueprintIR, interface: KernelInterface,
              jobs: list[PlannedJob]) -> bool:
        """The static check at one interface: a blueprint valid at the probe sizes can still
        break at one (a width that does not divide). That fails those jobs, not the blueprint."""
        try:
            validate(ir, interface=interface)
            return True
        except BlueprintValidationError as e:
            error = e
        failed = [j for j in jobs if j.interface == interface]
        self._progress(f"{blueprint.id[:12]} {blueprint.name} {interface}: does not fit: "
                       f"{error}")
        for job in failed:
            self._attempted.add(job.kernel_id)
            ledger.record_failure(self.urza, self.options.worker_id, job.kernel_id,
                                  _failure_details(job, "validation", str(error)))
        for target in dict.fromkeys(j.target for j in failed):
            self._bus.publish(Topic.COMPILATION_FAILED, CompilationFailed(
                blueprint_id=blueprint.id, stage="validation", reason=str(error),
                rule=error.rule, node=error.node, interface=str(interface), target=target))
        return False

    def _compile(self, blueprint: Blueprint, ir_bytes: bytes, job: PlannedJob) -> None:
        from pipelines.tezzeret.artifact import seal
        from pipelines.tezzeret.compile import CompileJob

        self._attempted.add(job.kernel_id)
        compile_job = CompileJob(blueprint_id=blueprint.id, ir_json=ir_bytes,
                                 interface=job.interface, device=job.device, dtype=job.dtype,
                                 pipeline=job.pipeline)
        job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=self._scratch))
        try:
            outcome = self._run_in_sandbox(blueprint, compile_job, job_dir / "out", job)
            if outcome.stopped:
                raise _Stop  # not the job's fault: nothing is recorded against it
            reason = outcome.reason
            if outcome.ok:
                try:
                    artifact = seal(compile_job, outcome.result, job_dir / "out", self.urza,
                                    self._forge_key)
                    if artifact.id != job.kernel_id:
                        log.warning("tezzeret: planned kernel %s, the child built %s (toolchain "
                                    "differs between forge and worker?)", job.kernel_id,
                                    artifact.id)
                    _, created = self.urza.add_kernel(artifact, actor=self.options.worker_id)
                    if created:
                        self._bus.publish(Topic.COMPILATION_KERNEL_READY, KernelReady(
                            kernel_artifact_id=artifact.id, blueprint_id=blueprint.id,
                            pipeline=job.pipeline.value, target=job.target))
                except (EsperError, OSError) as e:
                    reason = f"sealing failed: {e}"
            report = JobReport(blueprint.id, blueprint.name, job, reason is None, reason,
                               outcome.seconds, outcome.peak_rss_mb)
            if not report.ok:
                ledger.record_failure(self.urza, self.options.worker_id, job.kernel_id,
                                      _failure_details(job, "compile", reason))
                self._bus.publish(Topic.COMPILATION_FAILED, CompilationFailed(
                    blueprint_id=blueprint.id, stage="compile", reason=reason,
                    pipeline=job.pipeline.value, interface=str(job.interface),
                    target=job.target))
            self.summary.count(report)
            self._progress(report.line())
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    def _run_in_sandbox(self, blueprint: Blueprint, compile_job, out_dir: Path,
                        job: PlannedJob) -> SandboxOutcome:
        limits = self.options.limits[job.pipeline]
        controls = {"heartbeat": lambda: self._renew(blueprint),
                    "heartbeat_s": self.options.lease_seconds / 3,
                    "should_stop": self._stop.job_must_stop}
        if self._warm is not None and job.pipeline is CompilationPipeline.FAST:
            return self._warm.run(compile_job, out_dir, limits, **controls)
        return run_sandboxed(compile_job, out_dir, limits, **controls)

    def _renew(self, blueprint: Blueprint) -> bool:
        try:
            held = self.urza.renew_blueprint_lease(blueprint.id, self.options.worker_id,
                                                   self.options.lease_seconds)
        except EsperError as e:  # a busy catalog: keep working, the lease has time left
            log.warning("tezzeret: could not renew the lease on %s: %s", blueprint.id[:12], e)
            return True
        if not held:
            log.warning("tezzeret: lost the claim on %s (its lease expired); leaving it",
                        blueprint.id[:12])
        return held

    # Finding work ---------------------------------------------------------------------------
    def _missing_for(self, blueprint: Blueprint) -> list[PlannedJob]:
        existing = self.urza.list_kernels(blueprint_id=blueprint.id)
        wanted = self._wanted(blueprint, existing)
        return missing_jobs(wanted, built_ids=[k.id for k in existing],
                            failures=ledger.failure_counts(self.urza,
                                                           [j.kernel_id for j in wanted]),
                            max_attempts=self.options.max_attempts, attempted=self._attempted)

    def _wanted(self, blueprint: Blueprint, existing, requested=None) -> list[PlannedJob]:
        return wanted_jobs(
            blueprint, self._devices,
            requested=self.urza.requested_interfaces() if requested is None else requested,
            configured=self.options.interfaces, dtypes=self.options.dtypes, existing=existing,
            interest_threshold=self.options.interest_threshold,
            interest_pipeline=self.options.interest_pipeline)

    def _queue_waiting_work(self) -> bool:
        """Queue the COMPILED blueprints that lack required kernels (interfaces registered since
        they were compiled); when there are none, those with idle work, as many as today's
        budget allows. True if anything was queued (or found queued by another forge)."""
        compiled = self.urza.list_blueprints(status=BlueprintStatus.COMPILED)
        if not compiled:
            return False
        requested = self.urza.requested_interfaces()
        kernels: dict[str, list] = {}
        for kernel in self.urza.list_kernels():
            kernels.setdefault(kernel.blueprint_id, []).append(kernel)
        plans = []
        for blueprint in compiled:
            existing = kernels.get(blueprint.id, [])
            built = {k.id for k in existing}
            plans.append((blueprint, [j for j in self._wanted(blueprint, existing, requested)
                                      if j.kernel_id not in built
                                      and j.kernel_id not in self._attempted]))
        failures = ledger.failure_counts(self.urza, [j.kernel_id for _, jobs in plans
                                                     for j in jobs])

        def todo(jobs: list[PlannedJob], idle: bool) -> list[PlannedJob]:
            return [j for j in jobs if j.why.idle == idle
                    and failures.get(j.kernel_id, 0) < self.options.max_attempts]

        required = [(b, n) for b, jobs in plans if (n := len(todo(jobs, idle=False)))]
        for blueprint, n in required:
            self._queue(blueprint, f"{n} kernel(s) missing for requested interfaces")
        if required:
            return True
        allowance = self._idle_allowance()
        # Idle work: the blueprints Tamiyo wants most first (HLD 7.2.1 tier 1), then those
        # built with an older toolchain, oldest first (the sort is stable).
        idle = [(b, jobs) for b, all_jobs in plans if (jobs := todo(all_jobs, idle=True))]
        idle.sort(key=lambda item: -item[0].tamiyo_interest)
        queued = False
        for blueprint, jobs in idle:
            if allowance <= 0:
                break
            allowance -= len(jobs)
            reason = (f"idle: tamiyo_interest {blueprint.tamiyo_interest:g}"
                      if any(j.why is Why.INTEREST for j in jobs)
                      else "idle: rebuild with the current toolchain")
            queued = self._queue(blueprint, reason) or queued
        return queued

    def _queue(self, blueprint: Blueprint, reason: str) -> bool:
        try:
            self.urza.set_blueprint_status(blueprint.id, BlueprintStatus.COMPILING,
                                           actor=self.options.worker_id, reason=reason)
        except EsperError:
            return True  # another forge queued or archived it first: look again
        self.summary.queued += 1
        self._progress(f"{blueprint.id[:12]} {blueprint.name}: queued ({reason})")
        return True

    def _idle_allowance(self) -> int:
        """Idle compiles still allowed today (UTC), across every forge of the workspace."""
        if not self.options.idle_work:
            return 0
        return max(0, self.options.daily_compile_budget - ledger.compiles_today(self.urza))

    # Stopping -------------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self._stop.requested

    def _max_jobs_reached(self) -> bool:
        return self.options.max_jobs is not None and self.summary.jobs >= self.options.max_jobs


def _failure_details(job: PlannedJob, stage: str, reason: str | None) -> dict[str, Any]:
    return {"blueprint_id": job.blueprint_id, "stage": stage, "reason": reason,
            "interface": str(job.interface), "target": job.target, "dtype": job.dtype,
            "pipeline": job.pipeline.value, "why": job.why.value}


def run_forge(workspace: Workspace, redis_url: str | None, options: ForgeOptions, *, once: bool,
              progress: Callable[[str], None] | None = None) -> ForgeSummary:
    """What `esper forge` does: open the catalog and the bus, run a forge, close them."""
    with Urza.open(workspace) as urza:
        bus = daemon_bus.connect(workspace, redis_url, worker_id=options.worker_id, once=once,
                                 log=log, poll_interval_s=options.poll_interval_s)
        try:
            return Forge(workspace, urza, bus, options, progress=progress).run(once=once)
        finally:
            if bus is not None:
                bus.close()
