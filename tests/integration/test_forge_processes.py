"""`esper forge` as separate processes, the way it runs in production: two at once on one
workspace, one killed with SIGKILL mid-compile, daemons woken by the bus and stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from process_helpers import ESPER, sandbox_children, wait_for

from esper.blueprints import canonical_json, standard_library
from esper.contracts import BlueprintStatus, KernelInterface
from esper.library import init_workspace
from esper.oona import stop_embedded
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.tezzeret.forge import Forge, ForgeOptions

INTERFACES = ["--interface=linear:64:16", "--interface=linear:37:5", "--interface=conv2d:16:8:2"]


def forge_process(ws: Workspace, worker: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([ESPER, "--workspace", str(ws.root), "--json", "forge",
                             "--worker-id", worker, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def add_standard(urza: Urza, *names: str) -> list[str]:
    ids = []
    for ir in standard_library():
        if ir.name in names:
            blueprint, _ = urza.add_blueprint(canonical_json(ir), name=ir.name,
                                              interface_kind=ir.interface_kind, actor="test")
            ids.append(blueprint.id)
    return ids


def audit_rows(ws: Workspace, action: str) -> list[tuple[str, str, dict]]:
    conn = sqlite3.connect(ws.db_path)
    try:
        return [(actor, subject, json.loads(details)) for actor, subject, details in conn.execute(
            "SELECT actor, subject, details FROM audit_log WHERE action = ? ORDER BY seq",
            (action,))]
    finally:
        conn.close()


def test_two_forges_on_one_workspace_never_compile_the_same_job_twice(workspace):
    init_workspace(workspace)
    forges = [forge_process(workspace, f"forge-{n}", "--once", *INTERFACES) for n in (1, 2)]
    outputs = [p.communicate(timeout=180) for p in forges]
    for p, (_, err) in zip(forges, outputs, strict=True):
        assert p.returncode == 0, err
    summaries = [json.loads(out) for out, _ in outputs]

    built = [set(s["built"]) for s in summaries]
    assert not built[0] & built[1]
    assert sum(s["jobs"] for s in summaries) == len(built[0] | built[1])
    added = audit_rows(workspace, "kernel.added")
    assert sorted(subject for _, subject, _ in added) == sorted(built[0] | built[1])
    assert {actor for actor, _, _ in added} <= {"forge-1", "forge-2"}
    # Each blueprint was claimed by one forge, once.
    claimed = [subject for _, subject, _ in audit_rows(workspace, "blueprint.claimed")]
    assert len(claimed) == len(set(claimed)) == len(standard_library())
    with Urza.open(workspace) as urza:
        assert len(urza.list_kernels()) == len(added) == 35
        assert {b.status for b in urza.list_blueprints()} == {BlueprintStatus.COMPILED}
        assert urza.verify().ok


def test_a_forge_killed_mid_compile_leaves_its_blueprint_reclaimable(workspace):
    with Urza.open(workspace) as urza:
        [blueprint_id] = add_standard(urza, "mlp_relu_w16")
    # --no-warm: a fresh child per job, which spends its first seconds importing torch.
    doomed = forge_process(workspace, "forge-doomed", "--once", "--no-warm", "--lease-seconds",
                           "6", "--interface", "linear:64:16")
    try:
        wait_for(lambda: audit_rows(workspace, "blueprint.claimed"), 60, "the claim")
        [child] = wait_for(lambda: sandbox_children(doomed.pid, "pipelines.tezzeret.worker"), 10, "the compile child")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
    finally:
        doomed.kill()
        doomed.communicate()
    # The child dies with its forge (PR_SET_PDEATHSIG): no orphan compiles on.
    wait_for(lambda: not os.path.exists(f"/proc/{child}") or
             Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] == "Z", 10,
             "the child to die")

    with Urza.open(workspace) as urza:
        held = urza.get_blueprint(blueprint_id)
        assert held.status is BlueprintStatus.COMPILING
        assert urza.claim_next_blueprint("forge-eager", lease_seconds=60) is None  # still leased
        time.sleep(6.5)  # the dead forge's lease runs out
        heir = Forge(workspace, urza, None, ForgeOptions(
            worker_id="forge-heir", interfaces=(KernelInterface.parse("linear:64:16"),)))
        summary = heir.run(once=True)
        assert (summary.blueprints, summary.compiled, len(summary.built)) == (1, 1, 1)
        assert urza.get_blueprint(blueprint_id).status is BlueprintStatus.COMPILED
        assert len(urza.list_kernels(blueprint_id=blueprint_id)) == 1
    # The next forge on the machine swept the dead one's job files.
    assert not list(Path(tempfile.gettempdir()).glob(f"esper-forge-{doomed.pid}-*"))
    expired = audit_rows(workspace, "blueprint.lease_expired")
    assert [(actor, details["worker"]) for actor, _, details in expired] == [
        ("forge-heir", "forge-doomed")]


def test_a_daemon_is_woken_by_the_bus_and_exits_0_on_sigterm(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        add_standard(urza, "mlp_relu_w16")
    # The poll interval is long: finding the second blueprint quickly means the bus woke it.
    daemon = forge_process(workspace, "forge-d", "--poll-interval-s", "60", "--interface",
                           "linear:64:16")
    try:
        def compiled() -> int:
            with Urza.open(workspace) as urza:
                return len(urza.list_blueprints(status=BlueprintStatus.COMPILED))

        wait_for(lambda: compiled() == 1, 60, "the first blueprint")
        time.sleep(0.5)  # the daemon is now waiting on the bus
        ir_file = tmp_path / "mlp_relu_w4.json"
        ir_file.write_bytes(canonical_json(next(ir for ir in standard_library()
                                                 if ir.name == "mlp_relu_w4")))
        imported = subprocess.run([ESPER, "--workspace", str(workspace.root), "library",
                                   "import", str(ir_file)], check=False, capture_output=True,
                                  text=True, timeout=60)
        assert imported.returncode == 0, imported.stderr
        wait_for(lambda: compiled() == 2, 20, "the imported blueprint, woken by the bus")

        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        assert time.monotonic() - started < 5
        summary = json.loads(out)
        assert summary["stopped_by_signal"] and len(summary["built"]) == 2
    finally:
        daemon.kill()
        stop_embedded(workspace)


def test_sigterm_mid_compile_releases_the_claim_and_exits_0(workspace):
    with Urza.open(workspace) as urza:
        [blueprint_id] = add_standard(urza, "mlp_relu_w16")
    # A standard (torch.compile) job takes tens of seconds on a CPU; no grace: stop it at once.
    daemon = forge_process(workspace, "forge-t", "--pipelines", "standard", "--grace-s", "0",
                           "--interface", "linear:64:16")
    try:
        wait_for(lambda: audit_rows(workspace, "blueprint.claimed"), 60, "the claim")
        [child] = wait_for(lambda: sandbox_children(daemon.pid, "pipelines.tezzeret.worker"), 10,
                           "the compile child")
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        summary = json.loads(out)
        assert summary["stopped_by_signal"] and summary["released"] == 1
        assert summary["built"] == [] and summary["failed"] == []
        assert not os.path.exists(f"/proc/{child}")
    finally:
        daemon.kill()
        stop_embedded(workspace)
    with Urza.open(workspace) as urza:
        assert urza.get_blueprint(blueprint_id).status is BlueprintStatus.UNVALIDATED
        assert urza.list_kernels() == []
    assert [actor for actor, _, _ in audit_rows(workspace, "blueprint.released")] == ["forge-t"]
    assert audit_rows(workspace, "forge.compile_failed") == []  # a stop is not a failure


pytestmark = pytest.mark.timeout(240)
