"""`esper bench` over a damaged artifact store: a kernel whose blobs the workspace cannot give
back intact is not judged (its status is one-way), it waits PENDING_BENCHMARKING until the
store is repaired. A kernel whose blobs are intact but whose signed manifest does not verify or
names another kernel is still rejected: that is evidence about the kernel, not damage.

Real workspaces, real SQLite, kernels built through the forge's own path (`plant`), blobs
changed or removed on disk as a failing disk or a partial restore leaves them.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
from catalog_helpers import library_ir, plant
from process_helpers import wait_for
from typer.testing import CliRunner

from esper.contracts import KernelStatus
from esper.signing import sign
from esper.urza import Urza
from esper.workspace import Workspace
from esper_cli.main import app
from pipelines.tezzeret.compile import WEIGHTS_FILE
from pipelines.urabrask.bench import Bench, BenchOptions


def bench_once(ws: Workspace):
    return CliRunner().invoke(app, ["--workspace", str(ws.root), "--json", "bench", "--once",
                                    "--round-seconds", "0.03"], catch_exceptions=False)


def blob_of(urza: Urza, kernel_id: str, which: str) -> str:
    record = urza.kernel_load_record(kernel_id)
    if which == "manifest":
        return record.kernel_binary_ref
    if which == "blueprint IR":
        return record.blueprint_id
    body = json.loads(json.loads(urza.store.get(record.kernel_binary_ref))["body"])
    return body["files"][WEIGHTS_FILE]


def damage(urza: Urza, digest: str, how: str) -> bytes:
    """Corrupt (one byte flipped) or remove the blob; returns its bytes, the backup."""
    path = urza.store.path_for(digest)
    backup = path.read_bytes()
    if how == "missing":
        path.unlink()
    else:
        os.chmod(path, 0o644)
        flipped = bytearray(backup)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
    return backup


def restore(urza: Urza, digest: str, backup: bytes) -> None:
    path = urza.store.path_for(digest)
    path.unlink(missing_ok=True)
    urza.store.put(backup)
    assert urza.store.get(digest) == backup


def claims(urza: Urza, kernel_id: str) -> int:
    return urza.db.execute("SELECT count(*) FROM audit_log WHERE action = 'kernel.claimed'"
                           " AND subject = ?", (kernel_id,)).fetchone()[0]


@pytest.mark.parametrize(("which", "how"), [("manifest", "missing"), (WEIGHTS_FILE, "corrupt"),
                                            ("blueprint IR", "corrupt")])
def test_a_damaged_blob_leaves_the_kernel_pending_and_a_restore_lets_it_validate(
        workspace, tmp_path, which, how):
    with Urza.open(workspace) as urza:
        kernel_id = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
        digest = blob_of(urza, kernel_id, which)
        backup = damage(urza, digest, how)

    result = bench_once(workspace)

    # exit 3 (DESIGN.md 14: integrity), the kernel and the blob named on the last line
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.stderr
    *job_lines, last = result.stderr.strip().splitlines()
    assert last.startswith("error: ") and kernel_id in last and digest in last, result.stderr
    assert [line for line in job_lines if kernel_id in line and digest in line], result.stderr
    summary = json.loads(result.stdout)
    assert summary["jobs"] == [] and summary["rejected"] == 0
    [damaged] = summary["damaged"]
    assert damaged["kernel_id"] == kernel_id and digest in damaged["reason"]
    with Urza.open(workspace) as urza:
        kernel = urza.get_kernel(kernel_id)
        assert kernel.status is KernelStatus.PENDING_BENCHMARKING, kernel.status_reason
        assert urza.kernel_load_record(kernel_id).report_blob is None
        assert urza.db.execute("SELECT claimed_by FROM kernels WHERE id = ?",
                               (kernel_id,)).fetchone()[0] is None
        rows = [r for r in urza.audit_rows(subjects=[kernel_id])
                if r["action"] == "kernel.store_damaged"]
        assert len(rows) == 1 and digest in rows[0]["details"]["reason"]
        restore(urza, digest, backup)

    result = bench_once(workspace)

    assert result.exit_code == 0, result.output
    with Urza.open(workspace) as urza:
        assert urza.get_kernel(kernel_id).status is KernelStatus.VALIDATED
        assert urza.verify().ok


def _resigned_with_the_bench_key(urza: Urza, kernel_id: str, other_id: str) -> bytes:
    """The kernel's manifest, signed by the wrong key, naming a weights blob the store never
    held: only the signature may judge it, the missing blob it names is no damage."""
    document = json.loads(urza.store.get(urza.kernel_load_record(kernel_id).kernel_binary_ref))
    body = json.loads(document["body"])
    body["files"][WEIGHTS_FILE] = "0" * 64
    return sign(json.dumps(body, sort_keys=True).encode(), urza.workspace.private_key("bench"),
                "tezzeret")


def _another_kernels_manifest(urza: Urza, kernel_id: str, other_id: str) -> bytes:
    """A forge-signed, intact manifest: another kernel's."""
    return urza.store.get(urza.kernel_load_record(other_id).kernel_binary_ref)


@pytest.mark.parametrize(("document", "reason"), [
    (_resigned_with_the_bench_key, "load: kernel {}: manifest: signed by key"),
    (_another_kernels_manifest, "load: kernel {}: the signed manifest says kernel id"),
], ids=["wrong signature", "another kernel's manifest"])
def test_a_tampered_manifest_on_intact_blobs_is_still_rejected(workspace, tmp_path, document,
                                                                reason):
    with Urza.open(workspace) as urza:
        kernel_id = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
        other_id = plant(urza, tmp_path, library_ir("mlp_relu_w4"), "linear:16:4")
        urza.set_kernel_status(other_id, KernelStatus.ARCHIVED, actor="test",
                               reason="only its manifest is used here")
        forged = urza.store.put(document(urza, kernel_id, other_id))
        urza.db.execute("UPDATE kernels SET kernel_binary_ref = ? WHERE id = ?",
                        (forged, kernel_id))
        summary = Bench(workspace, urza, None, BenchOptions(round_seconds=0.03)).run(once=True)

        [job] = summary.jobs
        assert not job.validated and summary.damaged == {}
        kernel = urza.get_kernel(kernel_id)
        assert kernel.status is KernelStatus.REJECTED
        assert kernel.status_reason.startswith(reason.format(kernel_id)), kernel.status_reason


def test_a_daemon_judges_the_others_does_not_retry_the_damaged_kernel_and_takes_it_once_repaired(
        workspace, tmp_path):
    with Urza.open(workspace) as urza:
        damaged = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")  # oldest
        good = plant(urza, tmp_path, library_ir("mlp_relu_w4"), "linear:16:4")
        digest = blob_of(urza, damaged, WEIGHTS_FILE)
        backup = damage(urza, digest, "corrupt")
    lines: list[str] = []
    options = BenchOptions(round_seconds=0.03, poll_interval_s=0.05, max_jobs=2)
    summaries = []

    def daemon() -> None:
        with Urza.open(workspace) as urza:
            summaries.append(Bench(workspace, urza, None, options,
                                   progress=lines.append).run(once=False))

    thread = threading.Thread(target=daemon)
    thread.start()
    try:
        with Urza.open(workspace) as urza:
            wait_for(lambda: urza.get_kernel(good).status is KernelStatus.VALIDATED, 90,
                     "the intact kernel, judged after the damaged one")
            thread.join(timeout=1.0)  # about twenty idle polls with the blob still damaged
            assert thread.is_alive()
            assert urza.get_kernel(damaged).status is KernelStatus.PENDING_BENCHMARKING
            assert claims(urza, damaged) == 1  # claimed once, then left alone
            assert sum(damaged in line for line in lines) == 1, lines
            restore(urza, digest, backup)
            thread.join(timeout=90)
            assert not thread.is_alive()
            assert urza.get_kernel(damaged).status is KernelStatus.VALIDATED
            assert claims(urza, damaged) == 2
    finally:
        thread.join(timeout=120)
    [summary] = summaries
    assert summary.validated == 2 and summary.damaged == {}


def test_a_missing_forge_public_key_leaves_every_kernel_pending(workspace, tmp_path):
    with Urza.open(workspace) as urza:
        kernel_id = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
    key = workspace.public_key_path("forge")
    backup = key.read_bytes()
    key.unlink()
    with Urza.open(workspace) as urza:
        summary = Bench(workspace, urza, None, BenchOptions(round_seconds=0.03)).run(once=True)

        assert summary.jobs == [] and str(key) in summary.damaged[kernel_id]
        assert urza.get_kernel(kernel_id).status is KernelStatus.PENDING_BENCHMARKING
        key.write_bytes(backup)
        summary = Bench(workspace, urza, None, BenchOptions(round_seconds=0.03)).run(once=True)

        assert summary.validated == 1 and summary.damaged == {}
        assert urza.get_kernel(kernel_id).status is KernelStatus.VALIDATED


def test_verify_names_a_file_a_signed_manifest_names_but_the_store_lacks(workspace, tmp_path):
    """`esper library verify` finds the damage the bench would: the weights a kernel's signed
    manifest names are gone from the store (exit 3 there, one problem naming kernel and blob)."""
    with Urza.open(workspace) as urza:
        kernel_id = plant(urza, tmp_path, library_ir("low_rank_r2"), "linear:16:4")
        assert urza.verify().ok
        digest = blob_of(urza, kernel_id, WEIGHTS_FILE)
        damage(urza, digest, "missing")
        [problem] = urza.verify().problems
    assert kernel_id in problem and WEIGHTS_FILE in problem and digest in problem, problem
