"""`esper bench` end to end: real SQLite, real forge artifacts, real sandboxed children.

Planted bad kernels are real artifacts built through the forge's own path (`compile_job`, then
`seal` with the workspace's forge key): only their content is bad, each in a way a static check
of the IR cannot see:

- NaN output: the hidden layer's weights sealed with a NaN (a corrupted training export);
- no gradient: a dead ReLU layer (its bias sealed at -1e4): every hidden unit is zero for any
  input, so the layer before it never learns;
- huge allocation: a valid low-rank blueprint at an interface a million features wide: cheap
  to build, but the profiler's input alone is a gigabyte, past the child's memory limit;
- endless work: two 3x3 convolutions 256 channels wide, whose profiling run (~40 GFLOP a
  forward pass, dozens of passes) takes minutes on 2 cores, far past the wall-clock limit (a kernel that never returns ends the same
  way: the parent's clock kills the group).

Wrong shapes and non-determinism cannot be planted in an artifact on CPU: the builder rebuilds
every module from an IR the validator checked at the signed interface, and eager CPU ops are
deterministic for a seed. tests/unit/test_urabrask_gauntlet.py checks the gatekeeper against
real modules that have those faults.
"""

from __future__ import annotations

import pytest
import torch
from catalog_helpers import library_ir, mlp_ir, plant, wide_conv_ir
from typer.testing import CliRunner

from esper.contracts import KernelStatus, UrabraskValidationReport
from esper.errors import IntegrityError
from esper.signing import sign
from esper.urza import Urza
from esper_cli.main import app
from pipelines.tezzeret.sandbox import Limits
from pipelines.urabrask.bench import Bench, BenchOptions


def test_planted_bad_kernels_are_rejected_and_the_bench_goes_on(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        nan = plant(urza, tmp_path, mlp_ir("nan_weights", 8), "linear:12:5",
                    lambda s: s["layers.0.weight"].__setitem__((0, 0), float("nan")))
        dead = plant(urza, tmp_path, mlp_ir("dead_relu", 8), "linear:12:5",
                     lambda s: s["layers.0.bias"].fill_(-1e4))
        huge = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:1000000:4")
        slow = plant(urza, tmp_path, wide_conv_ir(), "conv2d:256:256:1")
        good = plant(urza, tmp_path, library_ir("mlp_relu_w16"), "linear:37:11")
        conv = plant(urza, tmp_path, library_ir("conv3x3_relu_w16"), "conv2d:6:10:2")
        lines: list[str] = []
        options = BenchOptions(limits=Limits(wall_s=14, cpu_s=28, memory_mb=1000),
                               round_seconds=0.05)
        summary = Bench(workspace, urza, None, options, progress=lines.append).run(once=True)

        verdicts = {j.kernel_id: j for j in summary.jobs}
        assert len(lines) == 6 and summary.validated == 2 and summary.rejected == 4, "\n".join(lines)
        expected = {nan: "finite_output: ", dead: "gradient_flow: parameter layers.0.weight",
                    huge: "sandbox: memory limit of 1000 MB exceeded",
                    slow: "sandbox: wall-clock limit of 14 s exceeded"}
        for kernel_id, reason in expected.items():
            kernel = urza.get_kernel(kernel_id)
            assert kernel.status is KernelStatus.REJECTED, kernel_id
            assert kernel.status_reason.startswith(reason), kernel.status_reason
            assert not verdicts[kernel_id].validated
        for kernel_id in (good, conv):
            kernel = urza.get_kernel(kernel_id)
            assert kernel.status is KernelStatus.VALIDATED
            report = kernel.validation_report
            for key in ("latency_ms_mean", "latency_ms_p50", "latency_ms_p99", "latency_cv_pct",
                        "throughput_calls_per_s", "memory_mb_peak", "param_count",
                        "flops_per_position", "precision_drift_vs_fp64"):
                assert report.benchmark_results[key] >= 0, key
            assert report.benchmark_results["latency_ms_p99"] >= report.benchmark_results[
                "latency_ms_p50"] > 0
            assert report.benchmark_results["precision_drift_vs_fp64"] < 1e-4
            assert "numerically_stable" in kernel.tags
            assert sum(t.endswith("_speed") for t in kernel.tags) == 1
            assert report.risk_score is not None and report.conf_level in ("Moderate", "High")
            assert report.hardware_context["torch"] == torch.__version__
            assert report.baseline_comparison["speedup_vs_eager"] == 1.0
        # The parameter count is the validator's: same number as the module the loader builds.
        assert urza.get_kernel(good).validation_report.benchmark_results["param_count"] == (
            37 * 16 + 16 + 16 * 11 + 11)
        # Nothing is left claimed, and a second pass finds no work.
        assert Bench(workspace, urza, None, options).run(once=True).jobs == []


def test_only_a_bench_signed_report_validates(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        kernel_id = plant(urza, tmp_path, library_ir("mlp_relu_w4"), "linear:9:3")
        kernel = urza.get_kernel(kernel_id)
        report = UrabraskValidationReport(kernel_artifact_id=kernel_id,
                                          blueprint_id=kernel.blueprint_id,
                                          passed_validation=True, benchmark_results={})
        forged = sign(report.to_json().encode(), workspace.private_key("forge"), "bench")
        with pytest.raises(IntegrityError):
            urza.apply_validation_report(forged, actor="mallory")
        assert urza.get_kernel(kernel_id).status is KernelStatus.PENDING_BENCHMARKING


def test_cli_bench_once_then_library_query_by_tag(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        small = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
        large = plant(urza, tmp_path, mlp_ir("wide_mlp_h2000", 2000), "linear:512:512")
    runner = CliRunner()
    result = runner.invoke(app, ["--workspace", str(workspace.root), "--json", "bench", "--once",
                                 "--round-seconds", "0.03"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with Urza.open(workspace) as urza:
        assert urza.get_kernel(small).status is KernelStatus.VALIDATED
        assert urza.get_kernel(large).status is KernelStatus.VALIDATED
        low = {k.id for k in urza.list_kernels(tag="low_memory")}
        high = {k.id for k in urza.list_kernels(tag="high_memory")}
    assert low == {small} and high == {large}
    query = runner.invoke(app, ["--workspace", str(workspace.root), "--json", "library", "query",
                                "--tag", "low_memory"], catch_exceptions=False)
    assert query.exit_code == 0, query.output
    assert small in query.output and large not in query.output
