"""The Urza catalog: blueprints and their status machine, claims, records, idempotent consumption,
the audit chain and schema migrations. Real SQLite files in a real workspace."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time

import pytest

from esper.contracts import (
    BLUEPRINT_TRANSITIONS,
    Blueprint,
    BlueprintStatus,
    FieldReport,
    KernelInterface,
    LayerKind,
    SeedLifecycle,
    TamiyoDecision,
)
from esper.errors import (
    BadInputError,
    EsperError,
    IllegalTransitionError,
    IntegrityError,
    NotFoundError,
)
from esper.urza import AuditCheck, Urza
from esper.workspace import Workspace


@pytest.fixture
def urza(workspace):
    with Urza.open(workspace) as u:
        yield u


def ir_bytes(n: int) -> bytes:
    return json.dumps({"name": f"design{n}", "layers": [n]}, sort_keys=True,
                      separators=(",", ":")).encode()


def add(urza: Urza, n: int, **kw) -> Blueprint:
    blueprint, created = urza.add_blueprint(ir_bytes(n), name=f"design{n}",
                                            interface_kind=LayerKind.LINEAR, actor="test", **kw)
    assert created
    return blueprint


def audit_rows(urza: Urza) -> list[dict]:
    return list(urza.db.query("SELECT * FROM audit_log ORDER BY seq"))


def field_report(n: int, run_id: str = "run1", outcome=SeedLifecycle.FOSSILIZED) -> FieldReport:
    return FieldReport(report_id=f"fr-{run_id}-{n}", run_id=run_id, blueprint_id="a" * 64,
                       kernel_artifact_id="aaaaaaaaaaaa-cpu-fast-000000", seed_id=f"0:{n}",
                       pre_metric=0.5, post_metric=0.6, outcome=outcome)


# Opening ------------------------------------------------------------------------------------

def test_open_creates_a_wal_catalog_with_every_table(workspace):
    with Urza.open(workspace) as urza:
        tables = set(urza.db.table_names())
        mode = urza.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert {"blueprints", "kernels", "kernel_tags", "validation_reports", "field_reports", "runs",
            "decisions", "audit_log", "policies", "processed_events", "interfaces",
            "schema_migrations"} <= tables


def test_reopening_applies_no_migration_twice(workspace):
    Urza.open(workspace).close()
    with Urza.open(workspace) as urza:
        assert [r["version"] for r in urza.db.query("SELECT version FROM schema_migrations")] == [1]


def test_a_catalog_from_a_newer_esper_is_refused(workspace):
    Urza.open(workspace).close()
    conn = sqlite3.connect(workspace.db_path)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', '2099-01-01')")
    conn.commit()
    conn.close()
    with pytest.raises(EsperError, match="newer"):
        Urza.open(workspace)


def test_open_outside_a_workspace_is_refused(tmp_path):
    with pytest.raises(NotFoundError, match="no Esper workspace"):
        Urza.open(Workspace(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere" / "urza.db").exists()


# Blueprints ---------------------------------------------------------------------------------

def test_add_blueprint_stores_the_ir_and_names_it_by_its_hash(urza):
    blueprint = add(urza, 1, metadata={"source": "unit"})
    assert blueprint.id == blueprint.architecture_ref
    assert urza.blueprint_ir(blueprint.id) == ir_bytes(1)
    assert blueprint.status is BlueprintStatus.UNVALIDATED and blueprint.origin == "human"
    again, created = urza.add_blueprint(ir_bytes(1), name="another name",
                                        interface_kind=LayerKind.LINEAR, actor="test")
    assert not created and again == blueprint  # a duplicate changes nothing
    assert [r["action"] for r in audit_rows(urza)] == ["blueprint.added"]


def test_add_blueprint_refuses_bad_input_and_changes_nothing(urza):
    parent = "f" * 64
    with pytest.raises(NotFoundError, match=parent):
        urza.add_blueprint(ir_bytes(1), name="x", interface_kind=LayerKind.LINEAR,
                           parent_ids=[parent], actor="test")
    with pytest.raises(BadInputError, match="origin"):
        urza.add_blueprint(ir_bytes(2), name="x", interface_kind=LayerKind.LINEAR,
                           origin="martians", actor="test")
    with pytest.raises(BadInputError, match="interface kind"):
        urza.add_blueprint(ir_bytes(3), name="x", interface_kind="lstm", actor="test")
    with pytest.raises(BadInputError):
        urza.add_blueprint("not bytes", name="x", interface_kind=LayerKind.LINEAR, actor="t")
    with pytest.raises(BadInputError, match="metadata"):
        urza.add_blueprint(ir_bytes(4), name="x", interface_kind=LayerKind.LINEAR,
                           metadata={"f": object()}, actor="test")
    assert urza.list_blueprints() == [] and audit_rows(urza) == []


def test_lineage_names_parents_that_exist(urza):
    parent = add(urza, 1)
    child, _ = urza.add_blueprint(ir_bytes(2), name="child", interface_kind=LayerKind.LINEAR,
                                  origin="karn", parent_ids=[parent.id], actor="karn")
    assert urza.get_blueprint(child.id).parent_ids == [parent.id]


def test_get_blueprint_by_unique_prefix_and_clear_errors(urza):
    blueprint = add(urza, 1)
    assert urza.get_blueprint(blueprint.id[:8]).id == blueprint.id
    with pytest.raises(NotFoundError, match="0123456789"):
        urza.get_blueprint("0123456789")
    with pytest.raises(BadInputError, match="too short"):
        urza.get_blueprint(blueprint.id[:3])
    # A kernel-shaped id can name no blueprint: not found, not a crash.
    with pytest.raises(NotFoundError):
        urza.get_blueprint("abcdef012345-cpu-fast-abcdef")


def test_an_ambiguous_prefix_is_refused_listing_the_candidates(urza):
    # Find two IRs whose hashes share their first 4 hex digits.
    seen: dict[str, int] = {}
    n = 0
    while True:
        n += 1
        prefix = hashlib.sha256(ir_bytes(n)).hexdigest()[:4]
        if prefix in seen:
            break
        seen[prefix] = n
    first, second = add(urza, seen[prefix]), add(urza, n)
    with pytest.raises(BadInputError, match="ambiguous") as e:
        urza.get_blueprint(prefix)
    assert first.id[:16] in str(e.value) and second.id[:16] in str(e.value)


def test_list_blueprints_filters(urza):
    a, b = add(urza, 1), add(urza, 2)
    urza.add_blueprint(ir_bytes(3), name="lib", interface_kind=LayerKind.LINEAR, origin="library",
                       actor="test")
    urza.set_blueprint_status(b.id, BlueprintStatus.INVALID, actor="test", reason="bad shapes")
    assert [x.id for x in urza.list_blueprints(status=BlueprintStatus.UNVALIDATED,
                                               origin="human")] == [a.id]
    assert [x.name for x in urza.list_blueprints(origin="library")] == ["lib"]
    assert [x.status_reason for x in urza.list_blueprints(name="design2")] == ["bad shapes"]
    with pytest.raises(BadInputError, match="blueprint status"):
        urza.list_blueprints(status="DONE")


def test_a_tampered_ir_blob_is_refused_naming_its_hash(urza):
    blueprint = add(urza, 1)
    path = urza.store.path_for(blueprint.architecture_ref)
    path.chmod(0o644)
    path.write_bytes(ir_bytes(1).replace(b"1", b"2"))
    with pytest.raises(IntegrityError, match=blueprint.architecture_ref):
        urza.blueprint_ir(blueprint.id)


def _blueprint_in(urza: Urza, status: BlueprintStatus, n: int) -> Blueprint:
    """A blueprint brought to `status` along legal paths."""
    blueprint = add(urza, n)
    if status is BlueprintStatus.UNVALIDATED:
        return blueprint
    if status in (BlueprintStatus.INVALID, BlueprintStatus.ARCHIVED):
        return urza.set_blueprint_status(blueprint.id, status, actor="test")
    claimed = urza.claim_next_blueprint("w", 60)
    assert claimed.id == blueprint.id
    if status is BlueprintStatus.COMPILED:
        return urza.set_blueprint_status(blueprint.id, status, actor="w", worker="w")
    return claimed


@pytest.mark.parametrize("old", list(BlueprintStatus))
@pytest.mark.parametrize("new", list(BlueprintStatus))
def test_blueprint_status_machine(urza, old, new):
    blueprint = _blueprint_in(urza, old, 1)
    assert blueprint.status is old
    before = audit_rows(urza)
    if new in BLUEPRINT_TRANSITIONS[old]:
        changed = urza.set_blueprint_status(blueprint.id, new, actor="op", reason="because")
        assert changed.status is new and changed.status_reason == "because"
        last = audit_rows(urza)[-1]
        assert (last["action"], last["subject"]) == ("blueprint.status", blueprint.id)
        assert json.loads(last["details"])["from"] == old.value
    else:
        with pytest.raises(IllegalTransitionError, match=f"{old.value} -> {new.value}"):
            urza.set_blueprint_status(blueprint.id, new, actor="op", reason="because")
        assert urza.get_blueprint(blueprint.id).status is old  # nothing overwritten
        assert audit_rows(urza) == before


def test_set_status_of_an_unknown_blueprint_names_it(urza):
    with pytest.raises(NotFoundError, match="f" * 64):
        urza.set_blueprint_status("f" * 64, BlueprintStatus.ARCHIVED, actor="op")


# The forge's queue ----------------------------------------------------------------------------

def test_claims_take_the_oldest_first_and_hand_out_each_once(urza):
    ids = [add(urza, n).id for n in range(3)]
    claimed = [urza.claim_next_blueprint("w1", 60) for _ in range(3)]
    assert [c.id for c in claimed] == ids
    assert all(c.status is BlueprintStatus.COMPILING for c in claimed)
    assert urza.claim_next_blueprint("w2", 60) is None


def test_only_the_claiming_worker_renews_releases_or_finishes(urza):
    blueprint = add(urza, 1)
    urza.claim_next_blueprint("w1", 60)
    assert not urza.renew_blueprint_lease(blueprint.id, "w2", 60)
    assert not urza.release_blueprint(blueprint.id, "w2")
    with pytest.raises(IllegalTransitionError, match="not claimed by 'w2'"):
        urza.set_blueprint_status(blueprint.id, BlueprintStatus.COMPILED, actor="w2", worker="w2")
    assert urza.renew_blueprint_lease(blueprint.id, "w1", 60)
    assert urza.release_blueprint(blueprint.id, "w1")
    assert urza.get_blueprint(blueprint.id).status is BlueprintStatus.UNVALIDATED
    assert not urza.release_blueprint(blueprint.id, "w1")  # already released
    with pytest.raises(NotFoundError):
        urza.renew_blueprint_lease("e" * 64, "w1", 60)
    actions = [r["action"] for r in audit_rows(urza)]
    assert actions == ["blueprint.added", "blueprint.claimed", "blueprint.released"]


def test_an_expired_lease_goes_back_to_the_queue(urza):
    blueprint = add(urza, 1)
    urza.claim_next_blueprint("dead-worker", 0.2)
    assert urza.claim_next_blueprint("w2", 60) is None
    time.sleep(0.3)
    taken = urza.claim_next_blueprint("w2", 60)
    assert taken.id == blueprint.id
    assert not urza.renew_blueprint_lease(blueprint.id, "dead-worker", 60)
    expired = [r for r in audit_rows(urza) if r["action"] == "blueprint.lease_expired"]
    assert [json.loads(r["details"])["worker"] for r in expired] == ["dead-worker"]


def test_setting_compiling_by_hand_queues_a_recompile(urza):
    blueprint = _blueprint_in(urza, BlueprintStatus.COMPILED, 1)
    urza.set_blueprint_status(blueprint.id, BlueprintStatus.COMPILING, actor="op",
                              reason="new toolchain")
    assert urza.claim_next_blueprint("w", 60).id == blueprint.id


def test_claims_refuse_nonsense_leases(urza):
    for lease in (0, -1, float("nan"), True, "60"):
        with pytest.raises(BadInputError, match="lease_seconds"):
            urza.claim_next_blueprint("w", lease)
    with pytest.raises(BadInputError, match="worker"):
        urza.claim_next_blueprint("", 60)


# Records --------------------------------------------------------------------------------------

def test_field_reports_are_kept_once_and_listed(urza):
    assert urza.record_field_report(field_report(1))
    assert not urza.record_field_report(field_report(1))
    urza.record_field_report(field_report(2, outcome=SeedLifecycle.CULLED))
    urza.record_field_report(field_report(1, run_id="run2"))
    assert [r.report_id for r in urza.list_field_reports(run_id="run1")] == ["fr-run1-1",
                                                                              "fr-run1-2"]
    culled = urza.list_field_reports(outcome=SeedLifecycle.CULLED)
    assert culled == [field_report(2, outcome=SeedLifecycle.CULLED)]
    assert len(urza.list_field_reports(limit=1)) == 1
    assert [r["action"] for r in audit_rows(urza)] == ["field_report.recorded"] * 3


def test_decisions_runs_and_policies(urza):
    decision = TamiyoDecision(decision_id="d1", run_id="run1", epoch=3, action="wait",
                              explanation="plateau not reached")
    assert urza.record_decision(decision) and not urza.record_decision(decision)
    assert urza.list_decisions(run_id="run1") == [decision]

    assert urza.register_run("run1", '{"lr": 0.1, "epochs": 3}')
    assert not urza.register_run("run1", '{"epochs": 3, "lr": 0.1}')  # same config, resumed
    with pytest.raises(BadInputError, match="different config"):
        urza.register_run("run1", '{"lr": 0.2}')
    with pytest.raises(BadInputError, match="not allowed"):
        urza.register_run("../escape", "{}")
    with pytest.raises(BadInputError, match="not JSON"):
        urza.register_run("run2", "{lr:")
    assert json.loads(urza.get_run("run1").config_json) == {"epochs": 3, "lr": 0.1}
    with pytest.raises(NotFoundError, match="nope"):
        urza.get_run("nope")

    blob = urza.store.put(b"policy weights")
    assert urza.record_policy("tamiyo", "v1", blob, {"reward": 1.5})
    assert not urza.record_policy("tamiyo", "v1", blob, {"reward": 1.5})
    with pytest.raises(BadInputError, match="immutable"):
        urza.record_policy("tamiyo", "v1", urza.store.put(b"other"), {})
    urza.record_policy("tamiyo", "v2", blob)
    assert urza.get_policy("tamiyo").version == "v2"
    assert urza.get_policy("tamiyo", "v1").metadata == {"reward": 1.5}
    with pytest.raises(BadInputError):
        urza.record_policy("tamiyo", "v3", "../../x", {})
    actions = [r["action"] for r in audit_rows(urza)]
    assert actions == ["decision.recorded", "run.registered", "policy.recorded", "policy.recorded"]


def test_requested_interfaces_are_counted(urza):
    face = KernelInterface.parse("linear:64:32")
    assert urza.register_interface(face, target="cpu", dtype="float32", actor="run1")
    assert not urza.register_interface(face, target="cpu", dtype="float32", actor="run2")
    assert urza.register_interface(face, target="cuda", dtype="bfloat16", actor="run2")
    with pytest.raises(BadInputError, match="target"):
        urza.register_interface(face, target="../gpu", dtype="float32")
    with pytest.raises(BadInputError, match="dtype"):
        urza.register_interface(face, target="cpu", dtype="int8")
    (cpu,) = urza.requested_interfaces(target="cpu")
    assert (cpu.interface, cpu.times_requested, cpu.first_requested_by) == (face, 2, "run1")
    assert len(urza.requested_interfaces()) == 2


# Transactions and idempotent consumption ------------------------------------------------------

def test_run_once_runs_an_effect_once_per_event(urza):
    calls = []

    def effect():
        calls.append(1)
        urza.record_field_report(field_report(len(calls)))

    assert urza.run_once("karn", "evt-1", effect)
    assert not urza.run_once("karn", "evt-1", effect)
    assert urza.run_once("simic", "evt-1", effect)  # another consumer group has its own record
    assert len(calls) == 2 and len(urza.list_field_reports()) == 2


def test_run_once_rolls_back_the_mark_and_the_effect_when_the_effect_fails(urza):
    def failing():
        urza.record_field_report(field_report(1))
        add(urza, 1)
        raise RuntimeError("consumer crashed")

    with pytest.raises(RuntimeError, match="consumer crashed"):
        urza.run_once("karn", "evt-1", failing)
    assert urza.list_field_reports() == [] and urza.list_blueprints() == []
    assert audit_rows(urza) == []
    assert urza.run_once("karn", "evt-1", lambda: urza.record_field_report(field_report(1)))
    assert len(urza.list_field_reports()) == 1
    assert urza.verify_audit_chain().ok


def test_a_failed_inner_block_rolls_back_alone(urza):
    with urza.transaction():
        urza.record_field_report(field_report(1))
        with pytest.raises(IllegalTransitionError), urza.transaction():
            urza.record_field_report(field_report(2))
            urza.set_blueprint_status(add(urza, 1).id, BlueprintStatus.COMPILED, actor="x")
        urza.record_field_report(field_report(3))
    assert [r.report_id for r in urza.list_field_reports()] == ["fr-run1-1", "fr-run1-3"]
    assert urza.list_blueprints() == []
    assert urza.verify_audit_chain() == AuditCheck(ok=True, rows=2)


# The audit log and the no-delete rule ---------------------------------------------------------

def _populate(urza: Urza) -> None:
    for n in range(4):
        add(urza, n)
    urza.claim_next_blueprint("w", 60)
    urza.record_field_report(field_report(1))


def test_the_audit_chain_verifies(urza):
    _populate(urza)
    check = urza.verify_audit_chain()
    assert check.ok and check.rows == 6 and check.first_bad_seq is None


def test_editing_one_audit_row_is_found_at_that_row(urza):
    _populate(urza)
    conn = sqlite3.connect(urza.workspace.db_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit_log SET details = '{}' WHERE seq = 3")
    # Someone with write access to the file can drop the guard; the chain still tells.
    conn.execute("DROP TRIGGER audit_log_append_only")
    conn.execute("""UPDATE audit_log SET details = '{"name":"forged"}' WHERE seq = 3""")
    conn.commit()
    conn.close()
    check = urza.verify_audit_chain()
    assert (check.ok, check.rows, check.first_bad_seq) == (False, 6, 3)
    assert "row_hash" in check.reason
    assert any("audit log: row 3" in p for p in urza.verify().problems)


def test_deleting_an_audit_row_is_found_at_the_next_one(urza):
    _populate(urza)
    conn = sqlite3.connect(urza.workspace.db_path)
    conn.execute("DROP TRIGGER audit_log_never_deleted")
    conn.execute("DELETE FROM audit_log WHERE seq = 2")
    conn.commit()
    conn.close()
    check = urza.verify_audit_chain()
    assert (check.ok, check.first_bad_seq) == (False, 3)


def test_nothing_is_hard_deleted(urza):
    add(urza, 1)
    urza.record_field_report(field_report(1))
    for table in ("blueprints", "field_reports", "audit_log"):
        with pytest.raises(sqlite3.DatabaseError, match="never deleted"):
            urza.db.execute(f"DELETE FROM {table}")
    assert len(urza.list_blueprints()) == 1


def test_audit_is_public_and_joins_the_chain(urza):
    seq = urza.audit("tolaria", "seed.rolled_back", "run1/0:3", {"epoch": 4})
    assert seq == 1 and urza.verify_audit_chain().ok
    with pytest.raises(BadInputError):
        urza.audit("tolaria", "x", "y", {"bad": object()})


def test_stats_and_verify_on_a_sound_catalog(urza):
    _populate(urza)
    stats = urza.stats()
    assert stats["blueprints"] == {"COMPILING": 1, "UNVALIDATED": 3}
    assert stats["field_reports"] == 1 and stats["audit_rows"] == 6 and stats["blobs"] == 4
    assert stats["blob_bytes"] == sum(len(ir_bytes(n)) for n in range(4))
    report = urza.verify()
    assert report.ok and report.problems == [] and report.blobs_checked == 4


def test_verify_reports_a_missing_ir_blob(urza):
    blueprint = add(urza, 1)
    urza.store.path_for(blueprint.architecture_ref).unlink()
    assert any("is missing" in p and blueprint.id in p for p in urza.verify().problems)
