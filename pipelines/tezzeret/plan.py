"""Which kernels a blueprint should have, and which of them the forge still has to build.

One kernel per (interface, device target, dtype, pipeline); its id hashes the toolchain, so "is
it built?" is "is that id in the catalog?". What a blueprint should have, in order:

1. requested: every interface runs registered in Urza for a target this forge builds for (with
   the dtype they asked for), in this device's pipelines;
2. configured: every `--interface` of the forge, in each of its dtypes and this device's
   pipelines;
3. toolchain (idle): every variant the blueprint already has for this target, rebuilt with the
   current toolchain (a new id when the toolchain changed; the old kernel stays and serves
   meanwhile, which is why this is idle work even for a variant that 1 or 2 asks for);
4. interest (idle): for a blueprint Tamiyo keeps asking for (`tamiyo_interest` at or above the
   threshold), the idle pipeline (aggressive by default) for each interface above.

1 and 2 are the forge's job and always run; 3 and 4 are idle work, run only when nothing else
waits and within the daily compile budget (HLD 7.2.1, J.6).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from esper.contracts import (
    Blueprint,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
    KernelStatus,
)
from esper.urza import RequestedInterface
from pipelines.tezzeret.toolchain import Toolchain, config_hash, kernel_artifact_id

PIPELINE_ORDER = (CompilationPipeline.FAST, CompilationPipeline.STANDARD,
                  CompilationPipeline.AGGRESSIVE)


class Why(str, Enum):
    """Why a kernel is wanted."""

    REQUESTED = "requested"
    CONFIGURED = "configured"
    TOOLCHAIN = "toolchain"
    INTEREST = "interest"

    @property
    def idle(self) -> bool:
        """Idle work: run only when nothing else waits, within the daily budget."""
        return self in (Why.TOOLCHAIN, Why.INTEREST)


@dataclass(frozen=True)
class DevicePlan:
    """One device this forge builds for."""

    device: str  # cpu, cuda, cuda:1
    target: str  # cpu, h100, ...
    toolchain: Toolchain
    pipelines: tuple[CompilationPipeline, ...]


@dataclass(frozen=True)
class PlannedJob:
    blueprint_id: str
    interface: KernelInterface
    device: str
    target: str
    dtype: str
    pipeline: CompilationPipeline
    kernel_id: str
    why: Why

    def describe(self) -> str:
        return f"{self.interface} {self.target} {self.dtype} {self.pipeline.value}"


def wanted_jobs(blueprint: Blueprint, devices: Sequence[DevicePlan], *,
                requested: Iterable[RequestedInterface],
                configured: Iterable[KernelInterface], dtypes: Sequence[str],
                existing: Iterable[CompiledKernelArtifact], interest_threshold: float,
                interest_pipeline: CompilationPipeline) -> list[PlannedJob]:
    """Every kernel `blueprint` should have on `devices`, built or not, most urgent first:
    required before idle, then fast before standard before aggressive."""
    requested = list(requested)
    configured = list(configured)
    existing = [k for k in existing if k.status is not KernelStatus.ARCHIVED]
    jobs: dict[str, PlannedJob] = {}
    kind = blueprint.interface_kind
    # Variants built before under any toolchain: rebuilding one with a newer toolchain is idle
    # work even when a run asked for it (the old kernel serves meanwhile).
    variants = {(str(k.interface), k.target, k.dtype, k.compilation_pipeline) for k in existing}

    def want(device: DevicePlan, interface: KernelInterface, dtype: str,
             pipeline: CompilationPipeline, why: Why) -> None:
        if not why.idle and (str(interface), device.target, dtype, pipeline) in variants:
            why = Why.TOOLCHAIN
        digest = config_hash(device.toolchain, interface, dtype, pipeline)
        kernel_id = kernel_artifact_id(blueprint.id, device.target, pipeline, digest)
        jobs.setdefault(kernel_id, PlannedJob(blueprint.id, interface, device.device,
                                              device.target, dtype, pipeline, kernel_id, why))

    for device in devices:
        faces: list[tuple[KernelInterface, str, Why]] = []
        faces += [(r.interface, r.dtype, Why.REQUESTED) for r in requested
                  if r.target == device.target and r.interface.kind == kind]
        faces += [(face, dtype, Why.CONFIGURED) for face in configured if face.kind == kind
                  for dtype in dtypes]
        for face, dtype, why in faces:
            for pipeline in device.pipelines:
                want(device, face, dtype, pipeline, why)
        built = [k for k in existing if k.target == device.target]
        for kernel in built:
            want(device, kernel.interface, kernel.dtype, kernel.compilation_pipeline,
                 Why.TOOLCHAIN)
        if blueprint.tamiyo_interest >= interest_threshold:
            seen = {(face, dtype) for face, dtype, _ in faces}
            seen |= {(k.interface, k.dtype) for k in built}
            for face, dtype in sorted(seen, key=lambda fd: (str(fd[0]), fd[1])):
                want(device, face, dtype, interest_pipeline, Why.INTEREST)
    order = {job.kernel_id: n for n, job in enumerate(jobs.values())}
    return sorted(jobs.values(), key=lambda j: (j.why.idle, PIPELINE_ORDER.index(j.pipeline),
                                                order[j.kernel_id]))


def missing_jobs(wanted: Iterable[PlannedJob], *, built_ids: Iterable[str],
                 failures: Mapping[str, int], max_attempts: int,
                 attempted: Iterable[str] = ()) -> list[PlannedJob]:
    """The wanted jobs not built yet, leaving out those that failed `max_attempts` times and
    those this process already tried (one attempt per job per run)."""
    skip = set(built_ids) | set(attempted)
    return [job for job in wanted
            if job.kernel_id not in skip and failures.get(job.kernel_id, 0) < max_attempts]
