"""Urabrask's loop: claim a kernel, run the gauntlet in a sandbox, sign the verdict, announce.

    bench = Bench(workspace, urza, bus, BenchOptions(device="cpu"))
    summary = bench.run(once=True)

One kernel at a time (DESIGN.md section 9, HLD Appendix E):

1. claim: `claim_next_kernel` takes the oldest PENDING_BENCHMARKING kernel for this bench's
   hardware target in one statement (a lease, renewed while the gauntlet runs);
2. stages 1-2 in a fresh sandboxed child (sandbox.py, gauntlet.py) under wall-clock, CPU-time
   and memory limits. A check that fails, a crash, a hang or a runaway allocation rejects the
   kernel with the reason; the bench goes on. A child that fails before it reaches its kernel
   (limits too small for Python and torch to start) blames no kernel: the claim is released,
   the summary says why (`sandbox_failure`), and the bench stops, since every gauntlet would
   fail the same way (and the released kernel, the oldest waiting, would be claimed again).
   Nor does a kernel whose blobs the workspace's store cannot give back intact (a missing blob,
   one that fails its sha256: `gauntlet.store_damage`): a verdict is one-way, and damage is no
   evidence about the kernel. Its claim is released, one line and an audit row
   (`kernel.store_damaged`) name the blob, the summary lists it (`damaged`), and this bench
   claims it no more until, at an idle poll, its blobs verify again;
3. stage 3 (tags.py) against the target's VALIDATED population, read from Urza at each job;
   after each validation the older kernels whose tags the grown population changes are
   re-tagged with one bench-signed UrabraskTagRefresh (`urza.apply_tag_refresh`);
4. stage 4 (risk.py): the latest risk model, retrained first when enough new field reports
   arrived, or the rule-based prior;
5. the UrabraskValidationReport is signed with the bench key and applied with
   `urza.apply_validation_report` (the only road to VALIDATED or REJECTED), then announced on
   `validation.kernel.characterized`.

When nothing waits it sleeps until `compilation.kernel.ready` wakes it (consumer group
"urabrask") or the poll interval passes. SIGINT/SIGTERM: the current gauntlet may finish within
the grace period (a second signal stops it at once), else the claim is released unjudged.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.contracts import (
    LATENCY_MS,
    CompiledKernelArtifact,
    KernelCharacterized,
    KernelStatus,
    Topic,
    UrabraskTagRefresh,
    UrabraskValidationReport,
)
from esper.errors import BadInputError, EsperError
from esper.oona import Oona
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines import daemon_bus
from pipelines.daemon_bus import DaemonBus
from pipelines.stopping import GracefulStop
from pipelines.tezzeret.sandbox import Limits, make_scratch
from pipelines.urabrask import risk, tags
from pipelines.urabrask.gauntlet import GauntletJob, store_damage

log = logging.getLogger("esper.urabrask")

CONSUMER_GROUP = "urabrask"
# Job files live in <tmp>/esper-bench-<pid>-XXXX/ while the bench runs.
_SCRATCH_PREFIX = "esper-bench-"
SIGNER = "bench"
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "host"
    return f"bench-{host}-{os.getpid()}"


def default_limits() -> Limits:
    """A gauntlet is a few seconds of measurement after torch's import; 4 GB covers the
    standard library at its profiling sizes many times over."""
    return Limits(wall_s=300, cpu_s=600, memory_mb=4096)


@dataclass(frozen=True)
class BenchOptions:
    worker_id: str = field(default_factory=default_worker_id)
    device: str = "cpu"
    lease_seconds: float = 120.0
    limits: Limits = field(default_factory=default_limits)
    poll_interval_s: float = 5.0
    max_jobs: int | None = None
    grace_s: float = 30.0
    rounds: int = 5
    round_seconds: float = 0.1

    def __post_init__(self) -> None:
        if not _DEVICE.match(self.device):
            raise BadInputError(f"bad device {self.device!r}: use cpu, cuda or cuda:N")
        if not self.lease_seconds > 0 or not self.poll_interval_s > 0:
            raise BadInputError("lease_seconds and poll_interval_s must be positive")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise BadInputError("--max-jobs must be at least 1")
        if self.grace_s < 0 or self.rounds < 2 or not self.round_seconds > 0:
            raise BadInputError("grace must not be negative, rounds at least 2, round_seconds "
                                "positive")


@dataclass(frozen=True)
class BenchJob:
    """One judged kernel, as the progress line and the summary tell it."""

    kernel_id: str
    validated: bool
    reason: str | None
    tags: tuple[str, ...]
    latency_ms: float | None
    memory_mb: float | None
    risk_score: float | None
    seconds: float

    def line(self) -> str:
        if self.validated:
            return (f"{self.kernel_id} VALIDATED {self.latency_ms:.4g} ms "
                    f"{self.memory_mb:.4g} MB risk {self.risk_score:.2f} "
                    f"[{', '.join(self.tags)}] ({self.seconds:.1f} s)")
        return f"{self.kernel_id} REJECTED: {self.reason} ({self.seconds:.1f} s)"

    def to_jsonable(self) -> dict[str, Any]:
        return {"kernel_id": self.kernel_id, "validated": self.validated, "reason": self.reason,
                "tags": list(self.tags), "latency_ms": self.latency_ms,
                "memory_mb": self.memory_mb, "risk_score": self.risk_score,
                "seconds": round(self.seconds, 3)}


@dataclass
class BenchSummary:
    worker_id: str
    jobs: list[BenchJob] = field(default_factory=list)
    released: int = 0
    retagged: int = 0
    risk_model: str = "prior"
    stopped_by_signal: bool = False
    sandbox_failure: str | None = None  # why no gauntlet child could start: the bench stopped
    # Kernels left unjudged, PENDING_BENCHMARKING, because the store cannot give back their
    # blobs intact: kernel id -> the damage, one line, until its blobs verify again.
    damaged: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def validated(self) -> int:
        return sum(1 for j in self.jobs if j.validated)

    @property
    def rejected(self) -> int:
        return sum(1 for j in self.jobs if not j.validated)

    def to_jsonable(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "validated": self.validated,
                "rejected": self.rejected, "released": self.released, "retagged": self.retagged,
                "risk_model": self.risk_model, "jobs": [j.to_jsonable() for j in self.jobs],
                "stopped_by_signal": self.stopped_by_signal,
                "sandbox_failure": self.sandbox_failure,
                "damaged": [{"kernel_id": k, "reason": r} for k, r in self.damaged.items()],
                "seconds": round(self.seconds, 3)}


class Bench:
    """One bench worker on one device. Use it from one thread; `run` may be called once."""

    def __init__(self, workspace: Workspace, urza: Urza, bus: Oona | None, options: BenchOptions,
                 *, progress: Callable[[str], None] | None = None):
        from pipelines.tezzeret.toolchain import device_target

        self.workspace = workspace
        self.urza = urza
        self.options = options
        self.target = device_target(options.device)
        self.summary = BenchSummary(worker_id=options.worker_id)
        self._progress = progress or log.info
        self._bus = DaemonBus(
            bus, group=CONSUMER_GROUP, wake_topic=Topic.COMPILATION_KERNEL_READY,
            worker_id=options.worker_id, log=log, poll_interval_s=options.poll_interval_s)
        self._bench_key = workspace.private_key("bench")
        self._stop = GracefulStop(options.grace_s, log=log, job="gauntlet")
        self._scratch: Path | None = None

    # The loop -------------------------------------------------------------------------------
    def run(self, once: bool) -> BenchSummary:
        started = time.monotonic()
        self._scratch = make_scratch(_SCRATCH_PREFIX)
        try:
            with self._stop.on_signals():
                self._loop(once)
        finally:
            self._bus.stopped()
            shutil.rmtree(self._scratch, ignore_errors=True)
            self.summary.stopped_by_signal = self._stop.requested
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def request_stop(self) -> None:
        """Ask the loop to stop (what SIGINT/SIGTERM do). A second request ends the current
        gauntlet at once instead of after the grace period."""
        self._stop.request()

    def _loop(self, once: bool) -> None:
        while (not self._stopping() and not self._max_jobs_reached()
               and self.summary.sandbox_failure is None):
            kernel = self.urza.claim_next_kernel(self.options.worker_id,
                                                 self.options.lease_seconds,
                                                 targets=[self.target],
                                                 exclude=self.summary.damaged)
            if kernel is not None:
                self._judge(kernel)
                continue
            if once:
                break
            self._bus.wait(self._stopping)
            self._forget_repaired()

    # One kernel -----------------------------------------------------------------------------
    def _judge(self, kernel: CompiledKernelArtifact) -> None:
        from pipelines.urabrask.sandbox import run_gauntlet_sandboxed

        job = GauntletJob(kernel_id=kernel.id, device=self.options.device,
                          rounds=self.options.rounds, round_seconds=self.options.round_seconds)
        outcome = run_gauntlet_sandboxed(
            self.workspace.root, job, self.options.limits,
            heartbeat=lambda: self._renew(kernel), heartbeat_s=self.options.lease_seconds / 3,
            should_stop=self._stop.job_must_stop, scratch_dir=self._scratch)
        if outcome.stopped:
            self._release(kernel)
            return
        if outcome.result is not None and outcome.result.store_damage is not None:
            self._leave_damaged(kernel, outcome.result.store_damage)
            return
        if not outcome.reached_kernel:
            limits = self.options.limits
            self.summary.sandbox_failure = outcome.reason
            self._release(kernel, why=(
                f"{outcome.reason} (limits: wall {limits.wall_s:g} s, CPU {limits.cpu_s:g} s, "
                f"memory {limits.memory_mb:g} MB); the bench stops: every gauntlet would fail "
                f"the same way"))
            return
        try:
            report = self._report(kernel, outcome)
            from esper.signing import sign

            document = sign(report.to_json().encode("utf-8"), self._bench_key, SIGNER)
            applied = self.urza.apply_validation_report(document, actor=self.options.worker_id)
        except EsperError as e:
            log.warning("urabrask: could not record the verdict on %s: %s", kernel.id, e)
            self._progress(f"{kernel.id} not recorded: {e}")
            self._release(kernel)
            return
        validated = applied.status is KernelStatus.VALIDATED
        result = report.benchmark_results
        entry = BenchJob(kernel.id, validated, report.rejection_reason,
                         tuple(report.generated_tags), result.get(LATENCY_MS),
                         result.get("memory_mb_peak"), report.risk_score, outcome.seconds)
        self.summary.jobs.append(entry)
        self._progress(entry.line())
        self._bus.publish(Topic.VALIDATION_KERNEL_CHARACTERIZED, KernelCharacterized(
            blueprint_id=kernel.blueprint_id, kernel_artifact_id=kernel.id,
            status="VALIDATED" if validated else "REJECTED", tags=list(report.generated_tags),
            latency_ms=result.get(LATENCY_MS), reason=report.rejection_reason))
        if validated:
            self._refresh_tags()

    def _leave_damaged(self, kernel: CompiledKernelArtifact, damage: str) -> None:
        """Give the kernel back unjudged, for good in this bench until its blobs verify again."""
        self.summary.damaged[kernel.id] = damage
        self._progress(f"{kernel.id} NOT JUDGED, the artifact store is damaged: {damage}; it "
                       "stays PENDING_BENCHMARKING until that is repaired")
        try:
            self.urza.audit(self.options.worker_id, "kernel.store_damaged", kernel.id,
                            {"reason": damage})
            self.urza.release_kernel(kernel.id, self.options.worker_id)
        except EsperError as e:  # its lease runs out instead
            log.warning("urabrask: could not release %s: %s", kernel.id, e)

    def _forget_repaired(self) -> None:
        """At an idle poll: the damaged kernels whose blobs verify now are claimed again."""
        for kernel_id in list(self.summary.damaged):
            try:
                repaired = store_damage(self.urza, kernel_id) is None
            except EsperError as e:  # the catalog cannot answer now: asked again next poll
                log.warning("urabrask: could not re-check %s: %s", kernel_id, e)
                continue
            if repaired:
                del self.summary.damaged[kernel_id]
                self._progress(f"{kernel_id}: its blobs verify again; it waits to be judged")

    def _refresh_tags(self) -> None:
        """Re-tag the target's VALIDATED kernels against the population as it now stands."""
        from esper.signing import sign

        validated = self.urza.list_kernels(status=KernelStatus.VALIDATED, target=self.target)
        changes = tags.retag_plan(validated, device_kind=self.options.device)
        if not changes:
            return
        peers = len(validated) - 1
        refresh = UrabraskTagRefresh(
            target=self.target, tags={k: new for k, (_, new) in changes.items()},
            population=peers,
            policy="percentile" if peers >= tags.MIN_POPULATION else "fixed_thresholds")
        try:
            changed = self.urza.apply_tag_refresh(
                sign(refresh.to_json().encode("utf-8"), self._bench_key, SIGNER),
                actor=self.options.worker_id)
        except EsperError as e:  # another bench re-tagged or moved one of them meanwhile
            log.warning("urabrask: tag refresh not applied: %s", e)
            return
        self.summary.retagged += len(changed)
        self._progress(f"re-tagged {len(changed)} kernel(s) against a population of "
                       f"{len(validated)} ({refresh.policy})")

    def _report(self, kernel: CompiledKernelArtifact, outcome) -> UrabraskValidationReport:
        result = outcome.result
        hardware = {"bench_worker": self.options.worker_id, "target": self.target}
        base = {"kernel_artifact_id": kernel.id, "blueprint_id": kernel.blueprint_id}
        if result is None:
            # A crash, a hang or a runaway allocation: the child's limits say which.
            return UrabraskValidationReport(
                **base, passed_validation=False, benchmark_results={},
                rejection_reason=f"sandbox: {outcome.reason}",
                hardware_context=hardware | {"sandbox_seconds": f"{outcome.seconds:.2f}",
                                             "sandbox_peak_rss_mb": f"{outcome.peak_rss_mb:.0f}"})
        hardware |= {k: str(v) for k, v in result.hardware.items()}
        if not result.passed:
            return UrabraskValidationReport(**base, passed_validation=False,
                                            benchmark_results={},
                                            rejection_reason=result.reason or result.check,
                                            hardware_context=hardware)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["sandbox_peak_rss_mb"] = round(outcome.peak_rss_mb, 1)
        peers = [k for k in self.urza.list_kernels(status=KernelStatus.VALIDATED,
                                                   target=kernel.target)
                 if k.validation_report is not None and k.id != kernel.id]
        population = [k.validation_report.benchmark_results for k in peers]
        generated = tags.generate_tags(metrics, population, device_kind=self.options.device,
                                       dtype=kernel.dtype)
        model = risk.maybe_retrain(self.urza, actor=self.options.worker_id)
        self.summary.risk_model = model.version if model is not None else "prior"
        feats = risk.features(metrics, pipeline=kernel.compilation_pipeline.value,
                              dtype=kernel.dtype)
        peer_feats = [risk.features(k.validation_report.benchmark_results,
                                    pipeline=k.compilation_pipeline.value, dtype=k.dtype)
                      for k in peers]
        assessed = risk.assess(feats, dtype=kernel.dtype, model=model, population=peer_feats)
        hardware["risk_model"] = assessed["risk_source"]
        hardware["tag_policy"] = ("percentile" if len(population) >= tags.MIN_POPULATION
                                  else "fixed_thresholds")
        hardware["tag_population"] = str(len(population))
        baseline = {k: float(v) for k, v in result.baseline.items()}
        fast = self._fast_twin(kernel)
        if fast is not None:
            fast_latency = fast.validation_report.benchmark_results[LATENCY_MS]
            hardware["fast_kernel_id"] = fast.id
            baseline["fast_kernel_latency_ms"] = fast_latency
            if metrics.get(LATENCY_MS, 0.0) > 0:
                baseline["speedup_vs_fast_kernel"] = fast_latency / metrics[LATENCY_MS]
        return UrabraskValidationReport(
            **base, passed_validation=True, benchmark_results=metrics, generated_tags=generated,
            baseline_comparison=baseline,
            hardware_context=hardware, risk_score=assessed["risk_score"],
            conf_level=assessed["conf_level"], urabrask_interest=assessed["urabrask_interest"])

    def _fast_twin(self, kernel: CompiledKernelArtifact) -> CompiledKernelArtifact | None:
        """The VALIDATED `fast` kernel of the same blueprint, interface, target and dtype, as
        measured by its own gauntlet (the in-run eager comparison is in result.baseline)."""
        if kernel.compilation_pipeline.value == "fast":
            return None
        for other in self.urza.list_kernels(status=KernelStatus.VALIDATED,
                                            blueprint_id=kernel.blueprint_id, target=kernel.target):
            if (other.compilation_pipeline.value == "fast" and other.interface == kernel.interface
                    and other.dtype == kernel.dtype and other.validation_report is not None
                    and LATENCY_MS in other.validation_report.benchmark_results):
                return other
        return None

    def _renew(self, kernel: CompiledKernelArtifact) -> bool:
        try:
            held = self.urza.renew_kernel_lease(kernel.id, self.options.worker_id,
                                                self.options.lease_seconds)
        except EsperError as e:
            log.warning("urabrask: could not renew the lease on %s: %s", kernel.id, e)
            return True
        if not held:
            log.warning("urabrask: lost the claim on %s; leaving it", kernel.id)
        return held

    def _release(self, kernel: CompiledKernelArtifact, why: str | None = None) -> None:
        try:
            if self.urza.release_kernel(kernel.id, self.options.worker_id):
                self.summary.released += 1
                self._progress(f"{kernel.id} released unjudged" + (f": {why}" if why else ""))
        except EsperError as e:
            log.warning("urabrask: could not release %s: %s", kernel.id, e)

    # Stopping -------------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self._stop.requested

    def _max_jobs_reached(self) -> bool:
        return self.options.max_jobs is not None and len(self.summary.jobs) >= self.options.max_jobs


def run_bench(workspace: Workspace, redis_url: str | None, options: BenchOptions, *, once: bool,
              progress: Callable[[str], None] | None = None) -> BenchSummary:
    """What `esper bench` does: open the catalog and the bus, run a bench, close them."""
    with Urza.open(workspace) as urza:
        bus = daemon_bus.connect(workspace, redis_url, worker_id=options.worker_id, once=once,
                                 log=log, poll_interval_s=options.poll_interval_s)
        try:
            return Bench(workspace, urza, bus, options, progress=progress).run(once=once)
        finally:
            if bus is not None:
                bus.close()
