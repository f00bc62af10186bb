"""Urza under real concurrency and real crashes: several processes on one catalog, workers that
die holding a claim, and kill -9 in the middle of a blob write or a transaction."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

from esper.contracts import BlueprintStatus, FieldReport, LayerKind, SeedLifecycle
from esper.urza import ArtifactStore, Urza
from esper.workspace import Workspace

# Workers that open the catalog start with 'spawn': a forked child would inherit the parent's
# SQLite connection, which SQLite forbids using (or even closing) across fork.
SPAWN = multiprocessing.get_context("spawn")
# The blob writer touches no SQLite and must restart fast, so it is forked.
FORK = multiprocessing.get_context("fork")


def ir_bytes(n: int, padding: int = 0) -> bytes:
    return json.dumps({"name": f"design{n}", "pad": "x" * padding}, sort_keys=True).encode()


# Child processes (module level: 'spawn' imports them by name) -----------------------------------

def _claim_all(root: str, worker: str, start, results) -> None:
    """A forge worker: claim until the queue is empty, finish each job, report what it took."""
    with Urza.open(Workspace(Path(root))) as urza:
        start.wait()
        taken = []
        while (blueprint := urza.claim_next_blueprint(worker, lease_seconds=60)) is not None:
            taken.append(blueprint.id)
            urza.set_blueprint_status(blueprint.id, BlueprintStatus.COMPILED, actor=worker,
                                      worker=worker)
        results.put((worker, taken))


def _choose_repeatedly(root: str, blueprint_id: str, times: int, start) -> None:
    """A training run's kernel chooser noting that it picked this blueprint, again and again."""
    with Urza.open(Workspace(Path(root))) as urza:
        start.wait()
        for _ in range(times):
            urza.add_tamiyo_interest(blueprint_id, 1.0, actor=f"run-{os.getpid()}")


def _claim_and_hang(root: str, worker: str, lease_seconds: float, results) -> None:
    """A worker that takes a job and then stops answering (until it is killed)."""
    with Urza.open(Workspace(Path(root))) as urza:
        results.put(urza.claim_next_blueprint(worker, lease_seconds).id)
        time.sleep(3600)


def _put_forever(artifacts_dir: str, payload: bytes) -> None:
    store = ArtifactStore(Path(artifacts_dir))
    n = 0
    while True:
        n += 1
        store.put(n.to_bytes(8, "big") + payload)


def _write_batches_forever(root: str, batch: int, ready) -> None:
    """Each round: one blueprint (its IR blob, then its row) and one transaction of `batch`
    field reports. Either a round's rows are all there or none are."""
    with Urza.open(Workspace(Path(root))) as urza:
        n = 0
        while True:
            n += 1
            urza.add_blueprint(ir_bytes(n, padding=256 * 1024), name=f"d{n}",
                               interface_kind=LayerKind.LINEAR, actor="writer")
            with urza.transaction():
                for i in range(batch):
                    urza.record_field_report(FieldReport(
                        report_id=f"r{n}-{i}", run_id=f"batch-{n}", blueprint_id="a" * 64,
                        kernel_artifact_id="aaaaaaaaaaaa-cpu-fast-000000", seed_id=f"0:{i}",
                        pre_metric=0.0, post_metric=1.0, outcome=SeedLifecycle.FOSSILIZED))
            if n == 3:
                ready.set()


def _temp_files(artifacts_dir: Path) -> list[Path]:
    return [p for p in (artifacts_dir / "sha256").glob("*/.*.tmp")]


def _kill(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    assert process.exitcode == -signal.SIGKILL


# Tests ------------------------------------------------------------------------------------------

def test_racing_workers_claim_every_blueprint_exactly_once(workspace):
    with Urza.open(workspace) as urza:
        ids = {urza.add_blueprint(ir_bytes(n), name=f"d{n}", interface_kind=LayerKind.LINEAR,
                                  actor="test")[0].id for n in range(40)}
    start, results = SPAWN.Event(), SPAWN.Queue()
    workers = [SPAWN.Process(target=_claim_all, args=(str(workspace.root), f"forge-{i}", start,
                                                      results)) for i in range(4)]
    for w in workers:
        w.start()
    start.set()
    taken = dict(results.get(timeout=60) for _ in workers)
    for w in workers:
        w.join(10)
        assert w.exitcode == 0

    claims = [bp for jobs in taken.values() for bp in jobs]
    assert sorted(claims) == sorted(ids)  # everything, and nothing twice
    with Urza.open(workspace) as urza:
        assert {b.status for b in urza.list_blueprints()} == {BlueprintStatus.COMPILED}
        claimed_rows = list(urza.db.query(
            "SELECT subject, actor FROM audit_log WHERE action = 'blueprint.claimed'"))
        assert sorted(r["subject"] for r in claimed_rows) == sorted(ids)
        assert all(r["subject"] in taken[r["actor"]] for r in claimed_rows)
        check = urza.verify_audit_chain()
        assert check.ok and check.rows == 40 * 3  # added, claimed, compiled


def test_racing_runs_each_count_their_choice_of_a_blueprint(workspace):
    with Urza.open(workspace) as urza:
        blueprint = urza.add_blueprint(ir_bytes(0), name="d0", interface_kind=LayerKind.LINEAR,
                                       actor="test")[0]
    start = SPAWN.Event()
    runs = [SPAWN.Process(target=_choose_repeatedly,
                          args=(str(workspace.root), blueprint.id, 25, start)) for _ in range(3)]
    for run in runs:
        run.start()
    start.set()
    for run in runs:
        run.join(60)
        assert run.exitcode == 0
    with Urza.open(workspace) as urza:
        assert urza.get_blueprint(blueprint.id).tamiyo_interest == 75.0  # no choice lost
        assert urza.verify_audit_chain().ok


def test_a_dead_workers_claim_is_taken_over_after_its_lease(workspace):
    with Urza.open(workspace) as urza:
        blueprint, _ = urza.add_blueprint(ir_bytes(1), name="d1",
                                          interface_kind=LayerKind.LINEAR, actor="test")
    results = SPAWN.Queue()
    dead = SPAWN.Process(target=_claim_and_hang, args=(str(workspace.root), "forge-dead", 1.5,
                                                       results))
    dead.start()
    assert results.get(timeout=30) == blueprint.id
    claimed_at = time.time()
    _kill(dead)

    with Urza.open(workspace) as urza:
        assert urza.claim_next_blueprint("forge-alive", 60) is None  # the lease still runs
        time.sleep(max(0.0, claimed_at + 1.6 - time.time()))
        taken = urza.claim_next_blueprint("forge-alive", 60)
        assert taken.id == blueprint.id and taken.status is BlueprintStatus.COMPILING
        assert not urza.renew_blueprint_lease(blueprint.id, "forge-dead", 60)
        urza.set_blueprint_status(blueprint.id, BlueprintStatus.COMPILED, actor="forge-alive",
                                  worker="forge-alive")
        actions = [(r["action"], r["actor"], json.loads(r["details"]).get("worker"))
                   for r in urza.db.query("SELECT * FROM audit_log ORDER BY seq")]
        assert ("blueprint.lease_expired", "forge-alive", "forge-dead") in actions
        assert urza.verify().ok


def test_kill_9_mid_put_leaves_no_partial_blob_under_a_final_name(tmp_path):
    artifacts = tmp_path / "artifacts"
    store = ArtifactStore(artifacts)
    payload = os.urandom(32 * 1024 * 1024)  # made once; the forked writer inherits it
    interrupted = False
    for _ in range(5):
        writer = FORK.Process(target=_put_forever, args=(str(artifacts), payload))
        writer.start()
        # Kill the moment a write is under way: its temporary file exists.
        deadline = time.time() + 30
        while not _temp_files(artifacts) and time.time() < deadline:
            time.sleep(0.001)
        _kill(writer)
        if _temp_files(artifacts):  # the write was cut short, not just finished
            interrupted = True
            break
    assert interrupted, "no kill landed inside a blob write"
    assert store.verify_all() == []  # every final name holds exactly the bytes it names
    assert all(len(store.get(h)) == len(payload) + 8 for h in store.iter_hashes())


def test_kill_9_mid_transaction_leaves_whole_rounds_only(workspace):
    batch = 200
    Urza.open(workspace).close()
    ready = SPAWN.Event()
    writer = SPAWN.Process(target=_write_batches_forever, args=(str(workspace.root), batch,
                                                                ready))
    writer.start()
    assert ready.wait(60)
    time.sleep(random.Random(11).uniform(0.05, 0.3))
    _kill(writer)

    conn = sqlite3.connect(workspace.db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    counts = conn.execute("SELECT run_id, count(*) FROM field_reports GROUP BY run_id").fetchall()
    conn.close()
    assert len(counts) >= 3 and {n for _, n in counts} == {batch}
    with Urza.open(workspace) as urza:
        # Rounds run in order: the last round's blueprint may be in without its batch.
        assert len(urza.list_blueprints()) in (len(counts), len(counts) + 1)
        report = urza.verify()  # the chain, every blob, every blueprint's IR blob present
        assert report.ok, report.problems
        assert report.audit.rows == len(urza.list_blueprints()) + batch * len(counts)
        # The dead writer left no lock behind: a new write goes through at once.
        urza.add_blueprint(b'{"after":"the crash"}', name="after", interface_kind=LayerKind.LINEAR,
                           actor="test")
