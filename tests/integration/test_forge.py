"""`esper forge` end to end on a real workspace: real SQLite, real child processes, real Redis.

The forge runs in-process here (CliRunner or `Forge.run`); test_forge_processes.py runs it as
separate processes (two at once, killed, signalled)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from esper import signing
from esper.blueprints import canonical_json, load_ir, standard_library
from esper.contracts import (
    BlueprintStatus,
    CompilationFailed,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
    KernelReady,
    KernelStatus,
    LayerKind,
    Topic,
)
from esper.library import init_workspace
from esper.oona import Oona, stop_embedded
from esper.urza import Urza
from esper.workspace import Workspace
from esper_cli.main import app
from pipelines.tezzeret.forge import Forge, ForgeOptions
from pipelines.tezzeret.loader import load_kernel
from pipelines.tezzeret.sandbox import Limits, WarmWorker

INTERFACES = ["linear:64:16", "linear:37:5", "conv2d:16:8:2"]


def esper(ws: Workspace | None, *args: str):
    prefix = ["--workspace", str(ws.root)] if ws else []
    return CliRunner().invoke(app, [*prefix, *args], catch_exceptions=False)


def ir_named(name: str):
    return next(ir for ir in standard_library() if ir.name == name)


def add_ir(urza: Urza, ir_dict: dict) -> str:
    """Register an IR as the catalog takes it: canonical bytes, no validation."""
    ir = load_ir(json.dumps(ir_dict))
    blueprint, _ = urza.add_blueprint(canonical_json(ir), name=ir.name,
                                      interface_kind=ir.interface_kind, actor="test")
    return blueprint.id


def shape_error_ir() -> dict:
    """Adds the host's input (IN wide) to a 16-wide hidden layer: a shape error at node 'mix'."""
    return {"format": "esper.blueprint/1", "name": "broken_residual", "interface_kind": "linear",
            "nodes": [{"id": "x", "op": "input"},
                      {"id": "hidden", "op": "linear", "inputs": ["x"], "attrs": {"out": 16}},
                      {"id": "mix", "op": "add", "inputs": ["x", "hidden"]},
                      {"id": "proj", "op": "linear", "inputs": ["mix"], "attrs": {"out": "out"}},
                      {"id": "y", "op": "output", "inputs": ["proj"]}]}


def wide_mlp_ir() -> dict:
    """Valid, and near the parameter budget at linear:2048:2048 (16.4M parameters)."""
    return {"format": "esper.blueprint/1", "name": "wide_mlp_h4000", "interface_kind": "linear",
            "nodes": [{"id": "x", "op": "input"},
                      {"id": "hidden", "op": "linear", "inputs": ["x"], "attrs": {"out": 4000}},
                      {"id": "act", "op": "relu", "inputs": ["hidden"]},
                      {"id": "proj", "op": "linear", "inputs": ["act"], "attrs": {"out": "out"}},
                      {"id": "y", "op": "output", "inputs": ["proj"]}]}


def audit_count(ws: Workspace, action: str) -> int:
    conn = sqlite3.connect(ws.db_path)
    try:
        return conn.execute("SELECT count(*) FROM audit_log WHERE action = ?",
                            (action,)).fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def library_ws(workspace) -> Workspace:
    init_workspace(workspace)
    return workspace


def test_help_lists_the_options_and_an_example():
    result = esper(None, "forge", "--help")
    assert result.exit_code == 0
    for option in ["--once", "--max-jobs", "--pipelines", "--device", "--interface", "--dtype",
                   "--lease-seconds", "--wall-limit-s", "--cpu-limit-s", "--memory-limit-mb"]:
        assert option in result.output, option
    assert "Example: esper forge" in result.output
    assert "forge" in esper(None, "--help").output


@pytest.mark.parametrize("args, named", [
    (["--device", "tpu"], "tpu"),
    (["--pipelines", "fast,turbo"], "turbo"),
    (["--interface", "linear:12"], "linear:12"),
    (["--dtype", "float8"], "float8"),
])
def test_bad_options_exit_2_in_one_line_and_claim_nothing(library_ws, args, named):
    result = esper(library_ws, "forge", "--once", *args)
    assert result.exit_code == 2, result.output
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with Urza.open(library_ws) as urza:
        assert {b.status for b in urza.list_blueprints()} == {BlueprintStatus.UNVALIDATED}


def test_once_builds_verified_loadable_fast_kernels_then_catches_up_new_interfaces(library_ws):
    args = ["--json", "forge", "--once"] + [f"--interface={i}" for i in INTERFACES]
    result = esper(library_ws, *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    linear = [ir for ir in standard_library() if ir.interface_kind is LayerKind.LINEAR]
    conv = [ir for ir in standard_library() if ir.interface_kind is LayerKind.CONV2D]
    assert len(summary["built"]) == 2 * len(linear) + len(conv)
    assert summary["failed"] == [] and summary["compiled"] == len(standard_library())
    # One progress line per job on stderr, none on stdout (which holds the JSON).
    assert sum("-> " in line for line in result.stderr.splitlines()) == len(summary["built"])

    with Urza.open(library_ws) as urza:
        assert urza.verify().ok, urza.verify().problems
        kernels = urza.list_kernels()
        assert sorted(k.id for k in kernels) == sorted(summary["built"])
        assert {k.status for k in kernels} == {KernelStatus.PENDING_BENCHMARKING}
        assert {b.status for b in urza.list_blueprints()} == {BlueprintStatus.COMPILED}
        assert {(str(k.interface), k.target, k.dtype, k.compilation_pipeline)
                for k in kernels} == {(i, "cpu", "float32", CompilationPipeline.FAST)
                                      for i in INTERFACES}
        # Loadable, and function-preserving as built (the output node starts at zero).
        names = {b.id: b.name for b in urza.list_blueprints()}
        for kernel in [k for k in kernels if names[k.blueprint_id] in
                       ("mlp_relu_w16", "conv3x3_relu_w16")]:
            loaded = load_kernel(urza, kernel.id, require_validated=False)
            face = kernel.interface
            x = (torch.randn(3, face.in_features, 8, 8) if face.kind is LayerKind.CONV2D
                 else torch.randn(5, face.in_features))
            y = loaded(x)
            assert y.shape[:2] == (x.shape[0], face.out_features)
            assert torch.count_nonzero(y) == 0

    # Nothing left: a second run builds nothing and claims nothing.
    again = json.loads(esper(library_ws, *args).stdout)
    assert again["built"] == [] and again["blueprints"] == 0

    # A run registers a new interface: COMPILED blueprints of that kind are queued and caught up.
    with Urza.open(library_ws) as urza:
        urza.register_interface(KernelInterface.parse("linear:32:8"), target="cpu",
                                dtype="float32")
    caught_up = json.loads(esper(library_ws, "--json", "forge", "--once").stdout)
    assert caught_up["queued"] == len(linear) == caught_up["compiled"]
    assert len(caught_up["built"]) == len(linear)
    assert all(kid.split("-")[2] == "fast" for kid in caught_up["built"])
    assert audit_count(library_ws, "kernel.added") == len(summary["built"]) + len(linear)


def test_an_invalid_blueprint_ends_invalid_with_its_reason_on_the_bus(workspace):
    try:
        with Urza.open(workspace) as urza, Oona.connect(workspace, sender_id="test") as bus:
            observer = bus.consumer("observer", [Topic.COMPILATION_FAILED,
                                                 Topic.COMPILATION_KERNEL_READY], "observer")
            bad = add_ir(urza, shape_error_ir())
            good = add_ir(urza, json.loads(canonical_json(ir_named("mlp_relu_w16"))))
            options = ForgeOptions(worker_id="forge-t",
                                   interfaces=(KernelInterface.parse("linear:64:16"),))
            summary = Forge(workspace, urza, bus, options).run(once=True)

            assert (summary.invalid, summary.compiled) == (1, 1)
            broken = urza.get_blueprint(bad)
            assert broken.status is BlueprintStatus.INVALID
            assert "node 'mix'" in broken.status_reason and "rule 'shape'" in broken.status_reason
            assert urza.list_kernels(blueprint_id=bad) == []
            assert urza.get_blueprint(good).status is BlueprintStatus.COMPILED

            messages = [d.envelope.payload for d in observer.read(count=10, block_ms=2000)]
            failures = [m for m in messages if isinstance(m, CompilationFailed)]
            assert len(failures) == 1
            failure = failures[0]
            assert (failure.blueprint_id, failure.stage, failure.rule, failure.node) == (
                bad, "validation", "shape", "mix")
            assert failure.reason == broken.status_reason
            ready = [m for m in messages if isinstance(m, KernelReady)]
            assert [(r.blueprint_id, r.pipeline, r.target) for r in ready] == [
                (good, "fast", "cpu")]
            assert ready[0].kernel_artifact_id == urza.list_kernels(blueprint_id=good)[0].id
    finally:
        stop_embedded(workspace)


def test_a_job_over_its_memory_limit_fails_alone_and_the_forge_goes_on(workspace, tmp_path):
    from pipelines.tezzeret.compile import CompileJob

    face = KernelInterface.parse("linear:2048:2048")
    with Urza.open(workspace) as urza:
        wide = add_ir(urza, wide_mlp_ir())  # first in the queue
        small = [add_ir(urza, json.loads(canonical_json(ir_named(name))))
                 for name in ("mlp_relu_w16", "low_rank_r4")]
        # The limit sits halfway between what a small and the wide job take (measured here).
        peaks = []
        with WarmWorker(scratch_dir=tmp_path / "measure") as worker:
            for blueprint_id in (small[0], wide):
                job = CompileJob(blueprint_id=blueprint_id,
                                 ir_json=urza.blueprint_ir(blueprint_id), interface=face,
                                 device="cpu", dtype="float32",
                                 pipeline=CompilationPipeline.FAST)
                outcome = worker.run(job, tmp_path / blueprint_id[:8], Limits(120, 240, 8192))
                assert outcome.ok, outcome.reason
                peaks.append(outcome.peak_rss_mb)
        assert peaks[1] - peaks[0] > 30, peaks
        options = ForgeOptions(worker_id="forge-m", interfaces=(face,)).with_limits(
            wall_s=120, cpu_s=240, memory_mb=round(sum(peaks) / 2))

        forge = Forge(workspace, urza, None, options)
        summary = forge.run(once=True)

        assert [f.job.blueprint_id for f in summary.failures] == [wide]
        assert "memory limit" in summary.failures[0].reason
        assert summary.compiled == 3  # the wide blueprint is valid: only its one job failed
        assert urza.list_kernels(blueprint_id=wide) == []
        for blueprint_id in small:
            assert len(urza.list_kernels(blueprint_id=blueprint_id)) == 1
        assert audit_count(workspace, "forge.compile_failed") == 1
        assert urza.verify().ok


def _old_toolchain_kernel(urza: Urza, ws: Workspace, blueprint_id: str) -> str:
    """A kernel as an older toolchain would have left it: same variant, another config hash."""
    manifest = signing.sign(json.dumps({"built": "by an older torch"}).encode(),
                            ws.private_key("forge"), "tezzeret")
    kernel = CompiledKernelArtifact(
        id=f"{blueprint_id[:12]}-cpu-fast-000000", blueprint_id=blueprint_id,
        compilation_pipeline=CompilationPipeline.FAST,
        interface=KernelInterface.parse("linear:64:16"), target="cpu", toolchain_hash="000000",
        kernel_binary_ref=urza.store.put(manifest))
    urza.add_kernel(kernel, actor="an-older-forge")
    return kernel.id


def test_idle_rebuilds_for_a_newer_toolchain_stay_within_the_daily_budget(workspace):
    with Urza.open(workspace) as urza:
        ids = [add_ir(urza, json.loads(canonical_json(ir_named(name))))
               for name in ("mlp_relu_w16", "low_rank_r4")]
        for blueprint_id in ids:
            _old_toolchain_kernel(urza, workspace, blueprint_id)
        # Today's compiles so far: the two old kernels. A budget of 2 allows no idle work.
        no_room = Forge(workspace, urza, None,
                        ForgeOptions(worker_id="forge-i", daily_compile_budget=2)).run(once=True)
        assert (no_room.compiled, no_room.jobs, no_room.queued) == (2, 0, 0)

        one_more = Forge(workspace, urza, None,
                         ForgeOptions(worker_id="forge-i", daily_compile_budget=3)).run(once=True)
        assert (one_more.queued, len(one_more.built), one_more.failures) == (1, 1, [])
        rebuilt = urza.get_kernel(one_more.built[0])
        assert rebuilt.blueprint_id == ids[0] and str(rebuilt.interface) == "linear:64:16"
        assert rebuilt.id != f"{ids[0][:12]}-cpu-fast-000000"
        assert urza.get_blueprint(ids[0]).status is BlueprintStatus.COMPILED

        without_idle = Forge(workspace, urza, None, ForgeOptions(
            worker_id="forge-i", daily_compile_budget=100, idle_work=False)).run(once=True)
        assert without_idle.jobs == 0


def test_shipped_config_loads_and_runs(tmp_path):
    """configs/forge.yaml parses into the options and a --once run on an empty catalog exits 0."""
    from pathlib import Path

    from typer.testing import CliRunner

    from esper.urza import Urza
    from esper.workspace import Workspace
    from esper_cli.main import app

    config = Path(__file__).resolve().parents[2] / "configs" / "forge.yaml"
    ws = Workspace(tmp_path / "ws")
    ws.create()
    Urza.open(ws).close()
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "--json", "forge", "--config",
                                      str(config), "--once", "--no-warm"])
    assert result.exit_code == 0, result.output


def test_bad_config_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from esper.workspace import Workspace
    from esper_cli.main import app

    ws = Workspace(tmp_path / "ws")
    ws.create()
    cases = {"unknown: 1\n": "unknown key 'unknown'", "lease_seconds: soon\n": "lease_seconds",
             "- a list\n": "mapping", "interface: [linear:3]\n": "linear:3"}
    for text, expected in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        result = CliRunner().invoke(app, ["--workspace", str(ws.root), "forge", "--config",
                                          str(bad), "--once"])
        assert result.exit_code == 2, (text, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (text, result.stderr)
