"""The compile sandbox with real child processes and real jobs: each limit stops a job that
exceeds it, a failing compile comes back as one line, and a warm worker outlives a failed job
or is replaced after a killed one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from esper.blueprints import canonical_json, load_ir, standard_library, validate
from esper.contracts import CompilationPipeline, KernelInterface
from pipelines.tezzeret.compile import CompileJob
from pipelines.tezzeret.sandbox import Limits, WarmWorker, run_sandboxed

GENEROUS = Limits(wall_s=120, cpu_s=240, memory_mb=8192)
WIDE = KernelInterface.parse("linear:2048:2048")


def wide_mlp_ir():
    """A valid blueprint near the parameter budget at 2048 wide: 16.4M parameters (66 MB)."""
    return load_ir(json.dumps({
        "format": "esper.blueprint/1", "name": "wide_mlp_h4000", "interface_kind": "linear",
        "nodes": [{"id": "x", "op": "input"},
                  {"id": "hidden", "op": "linear", "inputs": ["x"], "attrs": {"out": 4000}},
                  {"id": "act", "op": "relu", "inputs": ["hidden"]},
                  {"id": "proj", "op": "linear", "inputs": ["act"], "attrs": {"out": "out"}},
                  {"id": "y", "op": "output", "inputs": ["proj"]}]}))


def job_for(ir, interface: KernelInterface) -> CompileJob:
    from esper.blueprints import blueprint_id

    return CompileJob(blueprint_id=blueprint_id(ir), ir_json=canonical_json(ir),
                      interface=interface, device="cpu", dtype="float32",
                      pipeline=CompilationPipeline.FAST)


@pytest.fixture(scope="module")
def small_job() -> CompileJob:
    ir = next(i for i in standard_library() if i.name == "mlp_relu_w16")
    return job_for(ir, KernelInterface.parse("linear:64:16"))


def _orphans(out_dir: Path) -> list[int]:
    """Processes still running whose command line names `out_dir` (a job's child)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if str(out_dir).encode() in f.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_fresh_child_builds_the_job(tmp_path, small_job):
    outcome = run_sandboxed(small_job, tmp_path / "out", GENEROUS)
    assert outcome.ok, outcome.reason
    assert outcome.reason is None
    assert outcome.result.kernel_artifact_id.startswith(small_job.blueprint_id[:12] + "-cpu-fast-")
    assert (tmp_path / "out" / "result.json").is_file()
    assert (tmp_path / "out" / "weights.safetensors").is_file()
    assert 50 < outcome.peak_rss_mb < GENEROUS.memory_mb  # the interpreter and torch, at least


def test_wall_clock_limit_kills_the_child_and_its_group(tmp_path, small_job):
    # Starting Python and importing torch alone takes longer than this.
    outcome = run_sandboxed(small_job, tmp_path / "out", Limits(wall_s=0.5, cpu_s=60,
                                                                 memory_mb=8192))
    assert not outcome.ok and outcome.result is None
    assert outcome.reason == "wall-clock limit of 0.5 s exceeded"
    assert outcome.seconds < 5
    assert _orphans(tmp_path / "out") == []


def test_cpu_time_limit_ends_the_child(tmp_path, small_job):
    # Importing torch costs about 2 s of CPU on its own (2 cores, torch 2.13).
    outcome = run_sandboxed(small_job, tmp_path / "out", Limits(wall_s=60, cpu_s=1,
                                                                 memory_mb=8192))
    assert not outcome.ok
    assert outcome.reason == "CPU-time limit of 1 s exceeded"


def test_a_failing_compile_is_reported_in_one_line(tmp_path, small_job):
    # A conv2d interface for a linear blueprint: the compile itself refuses it.
    wrong = job_for(load_ir(small_job.ir_json), KernelInterface.parse("conv2d:16:8:1"))
    outcome = run_sandboxed(wrong, tmp_path / "out", GENEROUS)
    assert not outcome.ok and outcome.result is None
    assert "\n" not in outcome.reason and "interface" in outcome.reason, outcome.reason
    assert "Traceback" not in outcome.reason


def test_warm_worker_memory_limit_replaces_the_worker_and_goes_on(tmp_path, small_job):
    wide = job_for(wide_mlp_ir(), WIDE)
    assert validate(wide_mlp_ir(), WIDE).param_count > 16_000_000
    with WarmWorker(scratch_dir=tmp_path / "warm") as worker:
        # Measure both jobs under generous limits: the limit then sits between them.
        small = worker.run(small_job, tmp_path / "s1", GENEROUS)
        big = worker.run(wide, tmp_path / "b1", GENEROUS)
        assert small.ok and big.ok, (small.reason, big.reason)
        assert worker.starts == 1
        assert big.peak_rss_mb - small.peak_rss_mb > 30, (small.peak_rss_mb, big.peak_rss_mb)
        limit = Limits(wall_s=60, cpu_s=120,
                       memory_mb=round((small.peak_rss_mb + big.peak_rss_mb) / 2))

        over = worker.run(wide, tmp_path / "b2", limit)
        assert not over.ok
        assert over.reason.startswith(f"memory limit of {limit.memory_mb:g} MB exceeded")
        assert worker.pid is None  # killed with its job

        again = worker.run(small_job, tmp_path / "s2", limit)
        assert again.ok, again.reason
        assert worker.starts == 2

        # A job that fails by itself costs the worker nothing.
        wrong = job_for(load_ir(small_job.ir_json), KernelInterface.parse("conv2d:16:8:1"))
        failed = worker.run(wrong, tmp_path / "w", limit)
        assert not failed.ok and "\n" not in failed.reason
        assert worker.run(small_job, tmp_path / "s3", limit).ok
        assert worker.starts == 2
