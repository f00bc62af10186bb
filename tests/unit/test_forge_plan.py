"""What the forge decides to build (plan.py), what it remembers (ledger.py) and its options."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from esper.contracts import (
    Blueprint,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
    LayerKind,
)
from esper.errors import BadInputError
from esper.urza import RequestedInterface, Urza
from pipelines.tezzeret import ledger
from pipelines.tezzeret.forge import ForgeOptions
from pipelines.tezzeret.plan import DevicePlan, Why, missing_jobs, wanted_jobs
from pipelines.tezzeret.toolchain import Toolchain, config_hash, kernel_artifact_id

FAST, STANDARD, AGGRESSIVE = (CompilationPipeline.FAST, CompilationPipeline.STANDARD,
                              CompilationPipeline.AGGRESSIVE)
CPU_TOOLS = Toolchain(python="3.11.7", torch="2.13.0", triton=None, cuda=None, gpu_name=None,
                      cpu_capability="AVX2")
GPU_TOOLS = Toolchain(python="3.11.7", torch="2.13.0", triton="3.5.0", cuda="12.8",
                      gpu_name="NVIDIA H100 80GB HBM3")
CPU = DevicePlan("cpu", "cpu", CPU_TOOLS, (FAST,))
GPU = DevicePlan("cuda:0", "h100", GPU_TOOLS, (FAST, STANDARD))
L64 = KernelInterface.parse("linear:64:16")
L32 = KernelInterface.parse("linear:32:8")
C16 = KernelInterface.parse("conv2d:16:8:2")


def blueprint(interest: float = 0.0, kind: LayerKind = LayerKind.LINEAR) -> Blueprint:
    digest = hashlib.sha256(f"{kind.value}-design".encode()).hexdigest()
    return Blueprint(id=digest, name="design", architecture_ref=digest, interface_kind=kind,
                     tamiyo_interest=interest)


def requested(face: KernelInterface, target: str, dtype: str = "float32") -> RequestedInterface:
    now = datetime.now(UTC)
    return RequestedInterface(interface=face, target=target, dtype=dtype, times_requested=1,
                              first_requested_by="tolaria", first_requested_at=now,
                              last_requested_at=now)


def kernel(bp: Blueprint, face: KernelInterface, hash6: str = "000000",
           pipeline: CompilationPipeline = FAST, target: str = "cpu") -> CompiledKernelArtifact:
    return CompiledKernelArtifact(id=f"{bp.id[:12]}-{target}-{pipeline.value}-{hash6}",
                                  blueprint_id=bp.id, compilation_pipeline=pipeline,
                                  interface=face, target=target, toolchain_hash=hash6,
                                  kernel_binary_ref="0" * 64)


def plan(bp, devices=(CPU,), requests=(), configured=(), dtypes=("float32",), existing=(),
         threshold=1.0):
    return wanted_jobs(bp, list(devices), requested=requests, configured=configured,
                       dtypes=dtypes, existing=existing, interest_threshold=threshold,
                       interest_pipeline=AGGRESSIVE)


def test_requested_and_configured_interfaces_by_kind_target_dtype_and_pipeline():
    bp = blueprint()
    jobs = plan(bp, devices=(CPU, GPU),
                requests=[requested(L64, "cpu", "bfloat16"), requested(L32, "h100"),
                          requested(C16, "cpu"), requested(L64, "a100")],
                configured=[L64, C16], dtypes=("float32", "float16"))
    got = {(str(j.interface), j.device, j.target, j.dtype, j.pipeline, j.why) for j in jobs}
    assert got == {
        ("linear:64:16", "cpu", "cpu", "bfloat16", FAST, Why.REQUESTED),
        ("linear:32:8", "cuda:0", "h100", "float32", FAST, Why.REQUESTED),
        ("linear:32:8", "cuda:0", "h100", "float32", STANDARD, Why.REQUESTED),
        *{("linear:64:16", "cpu", "cpu", dtype, FAST, Why.CONFIGURED)
          for dtype in ("float32", "float16")},
        *{("linear:64:16", "cuda:0", "h100", dtype, pipeline, Why.CONFIGURED)
          for dtype in ("float32", "float16") for pipeline in (FAST, STANDARD)},
    }  # no conv interface for a linear blueprint, nothing for a target this forge lacks
    assert [j.pipeline for j in jobs] == sorted((j.pipeline for j in jobs),
                                                key=[FAST, STANDARD, AGGRESSIVE].index)
    job = jobs[0]
    assert job.kernel_id == kernel_artifact_id(
        bp.id, job.target, job.pipeline,
        config_hash(CPU_TOOLS if job.target == "cpu" else GPU_TOOLS, job.interface, job.dtype,
                    job.pipeline))
    assert len({j.kernel_id for j in jobs}) == len(jobs)


def test_a_variant_built_by_an_older_toolchain_is_idle_work():
    bp = blueprint()
    old = kernel(bp, L32)  # linear:32:8 fast, built by another toolchain
    jobs = plan(bp, requests=[requested(L64, "cpu"), requested(L32, "cpu")], existing=[old])
    assert [(str(j.interface), j.why) for j in jobs] == [("linear:64:16", Why.REQUESTED),
                                                         ("linear:32:8", Why.TOOLCHAIN)]
    # A kernel for another target is left to the forges of that target.
    assert plan(bp, existing=[kernel(bp, L64, target="a100")]) == []


def test_high_interest_adds_the_idle_pipeline_last():
    jobs = plan(blueprint(interest=3.0), configured=[L64], threshold=2.0)
    assert [(j.pipeline, j.why) for j in jobs] == [(FAST, Why.CONFIGURED),
                                                   (AGGRESSIVE, Why.INTEREST)]
    assert Why.INTEREST.idle and Why.TOOLCHAIN.idle and not Why.REQUESTED.idle
    assert [j.why for j in plan(blueprint(interest=1.0), configured=[L64], threshold=2.0)] == [
        Why.CONFIGURED]


def test_missing_leaves_out_built_failed_and_attempted_jobs():
    jobs = plan(blueprint(), configured=[L64, L32], dtypes=("float32", "float16", "bfloat16"))
    ids = [j.kernel_id for j in jobs]
    left = missing_jobs(jobs, built_ids=[ids[0]], failures={ids[1]: 2, ids[2]: 1},
                        max_attempts=2, attempted=[ids[3]])
    assert [j.kernel_id for j in left] == [ids[2], *ids[4:]]


def test_options_defaults_and_bad_values():
    options = ForgeOptions()
    assert options.pipelines_for("cpu") == (FAST,)
    assert options.pipelines_for("cuda:1") == (FAST, STANDARD)
    assert ForgeOptions(pipelines=(STANDARD,)).pipelines_for("cpu") == (STANDARD,)
    tight = options.with_limits(wall_s=5, memory_mb=300)
    assert {(lim.wall_s, lim.memory_mb) for lim in tight.limits.values()} == {(5, 300)}
    assert tight.limits[FAST].cpu_s == options.limits[FAST].cpu_s
    for bad in [{"devices": ("tpu",)}, {"devices": ()}, {"dtypes": ("float8",)},
                {"devices": ("cpu", "cpu")}, {"max_jobs": 0}, {"lease_seconds": 0}]:
        with pytest.raises(BadInputError):
            ForgeOptions(**bad)
    with pytest.raises(BadInputError):
        options.with_limits(wall_s=-1)


def test_ledger_counts_failures_per_job_and_todays_compiles(workspace):
    with Urza.open(workspace) as urza:
        for subject in ("aaaaaaaaaaaa-cpu-fast-000001", "aaaaaaaaaaaa-cpu-fast-000001",
                        "aaaaaaaaaaaa-cpu-fast-000002"):
            ledger.record_failure(urza, "forge-1", subject, {"reason": "test"})
        urza.audit("someone", "blueprint.status", "aaaaaaaaaaaa-cpu-fast-000003", {})
        counts = ledger.failure_counts(urza, ["aaaaaaaaaaaa-cpu-fast-000001",
                                              "aaaaaaaaaaaa-cpu-fast-000002",
                                              "aaaaaaaaaaaa-cpu-fast-000003"])
        assert counts == {"aaaaaaaaaaaa-cpu-fast-000001": 2, "aaaaaaaaaaaa-cpu-fast-000002": 1}
        assert ledger.compiles_today(urza) == 3
        assert ledger.compiles_today(urza, now=datetime.now(UTC) + timedelta(days=1)) == 0
