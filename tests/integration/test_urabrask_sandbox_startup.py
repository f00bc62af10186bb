"""A bench limit too small for the gauntlet child to start blames no kernel.

Real SQLite workspace, real forge artifacts, real sandboxed children. Python alone is ~10 MB
resident and torch's import takes ~2 s, so a 1 MB memory limit or a 0.3 s wall clock kills
every child before it reaches its kernel: the kernel is released back to the queue unjudged
(still PENDING_BENCHMARKING, no claim), the summary says why, and the bench stops instead of
claiming the same kernel again. A kernel that exceeds a limit in its own run is still rejected.
"""

from __future__ import annotations

import pytest
from catalog_helpers import library_ir, plant
from typer.testing import CliRunner

from esper.contracts import KernelStatus
from esper.urza import Urza
from esper_cli.main import app
from pipelines.tezzeret.sandbox import Limits
from pipelines.urabrask.bench import Bench, BenchOptions


@pytest.mark.parametrize(("limits", "named"), [
    (Limits(wall_s=120, cpu_s=240, memory_mb=1), "memory limit of 1 MB exceeded"),
    (Limits(wall_s=0.3, cpu_s=240, memory_mb=4096), "wall-clock limit of 0.3 s exceeded"),
], ids=["memory", "wall"])
def test_a_limit_too_small_to_start_releases_the_kernel_and_stops(workspace, tmp_path, limits,
                                                                  named):
    with Urza.open(workspace) as urza:
        first = plant(urza, tmp_path, library_ir("mlp_relu_w4"), "linear:9:3")
        second = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
        lines: list[str] = []
        summary = Bench(workspace, urza, None, BenchOptions(limits=limits),
                        progress=lines.append).run(once=True)

        # One attempt, no verdict: the first kernel is released, the second never claimed.
        assert summary.jobs == [] and summary.released == 1, lines
        assert summary.sandbox_failure.startswith(named)
        assert ("before the gauntlet child loaded the kernel: the limit is too small for the "
                "sandbox to start") in summary.sandbox_failure
        assert summary.to_jsonable()["sandbox_failure"] == summary.sandbox_failure
        assert len(lines) == 1 and lines[0].startswith(f"{first} released unjudged: {named}")
        assert "the bench stops" in lines[0]
        for kernel_id in (first, second):
            kernel = urza.get_kernel(kernel_id)
            assert kernel.status is KernelStatus.PENDING_BENCHMARKING
            assert kernel.validation_report is None and kernel.status_reason is None
        # The claim is free: another bench takes the oldest kernel at once.
        assert urza.claim_next_kernel("other-bench", 60, targets=["cpu"]).id == first
        assert urza.release_kernel(first, "other-bench")


def test_a_released_kernel_validates_under_limits_it_can_start_in(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        kernel_id = plant(urza, tmp_path, library_ir("mlp_relu_w4"), "linear:9:3")
        tiny = BenchOptions(limits=Limits(wall_s=120, cpu_s=240, memory_mb=1))
        assert Bench(workspace, urza, None, tiny).run(once=True).released == 1

        summary = Bench(workspace, urza, None, BenchOptions(round_seconds=0.03)).run(once=True)
        assert summary.validated == 1 and summary.sandbox_failure is None
        assert urza.get_kernel(kernel_id).status is KernelStatus.VALIDATED


def test_a_kernel_over_the_memory_limit_in_its_own_run_is_still_rejected(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        # Valid and cheap to build, but the profiler's input alone is a gigabyte.
        huge = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:1000000:4")
        options = BenchOptions(limits=Limits(wall_s=120, cpu_s=240, memory_mb=1000))
        summary = Bench(workspace, urza, None, options).run(once=True)

        assert summary.released == 0 and summary.sandbox_failure is None
        assert summary.rejected == 1
        kernel = urza.get_kernel(huge)
        assert kernel.status is KernelStatus.REJECTED
        assert kernel.status_reason.startswith("sandbox: memory limit of 1000 MB exceeded")


def test_esper_bench_with_limits_no_gauntlet_can_start_in_exits_2(workspace, tmp_path):
    """On the command line, a bench that had to stop for its limits is bad input: exit 2, the
    summary and then one line saying why."""
    with Urza.open(workspace) as urza:
        kernel_id = plant(urza, tmp_path, library_ir("mlp_relu_w4"), "linear:9:3")
    result = CliRunner().invoke(app, ["--workspace", str(workspace.root), "bench", "--once",
                                      "--memory-limit-mb", "1"])
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the bench stopped: memory limit of 1 MB exceeded")
    assert "0 validated, 0 rejected, 1 released" in result.stdout
    with Urza.open(workspace) as urza:
        assert urza.get_kernel(kernel_id).status is KernelStatus.PENDING_BENCHMARKING
