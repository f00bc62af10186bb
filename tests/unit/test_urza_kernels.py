"""Kernels in the catalog: registration, the status machine, bench-signed validation, the bench's
queue, and Tamiyo's KernelQuery on a synthetic population."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from catalog_helpers import blueprint, kernel

from esper.contracts import (
    KERNEL_TRANSITIONS,
    LATENCY_MS,
    MEMORY_MB,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
    KernelQuery,
    KernelStatus,
    LayerKind,
    UrabraskTagRefresh,
    UrabraskValidationReport,
)
from esper.errors import (
    BadInputError,
    IllegalTransitionError,
    IntegrityError,
    NotFoundError,
)
from esper.signing import generate_keypair, load_private_key, sign
from esper.urza import Urza
from esper.workspace import Workspace


@pytest.fixture
def urza(workspace):
    with Urza.open(workspace) as u:
        yield u


def signed_report(workspace: Workspace, k: CompiledKernelArtifact, *, passed: bool = True,
                  latency: float | None = 1.0, memory: float | None = 10.0,
                  tags: tuple[str, ...] = (), key: str = "bench", blueprint_id: str | None = None,
                  kernel_id: str | None = None) -> bytes:
    results = {}
    if latency is not None:
        results[LATENCY_MS] = latency
    if memory is not None:
        results[MEMORY_MB] = memory
    report = UrabraskValidationReport(
        kernel_artifact_id=kernel_id or k.id, blueprint_id=blueprint_id or k.blueprint_id,
        passed_validation=passed, rejection_reason=None if passed else "NaN in backward pass",
        benchmark_results=results, generated_tags=list(tags))
    return sign(report.to_json().encode(), workspace.private_key(key), signer=key)


def audit_actions(urza: Urza) -> list[str]:
    return [r["action"] for r in urza.db.query("SELECT action FROM audit_log ORDER BY seq")]


# Registration -------------------------------------------------------------------------------

def test_add_kernel_registers_a_pending_artifact(urza):
    bp = blueprint(urza, "mlp")
    k = kernel(urza, bp, tags=("untested",))
    assert k.status is KernelStatus.PENDING_BENCHMARKING and k.tags == ["untested"]
    assert urza.get_kernel(k.id) == k == urza.get_kernel(k.id[:16])
    assert urza.add_kernel(k, actor="forge") == (k, False)
    assert urza.get_blueprint(bp.id).compiled_artifacts == {k.id: k}
    assert audit_actions(urza) == ["blueprint.added", "kernel.added"]


def test_add_kernel_refuses_what_does_not_fit(urza):
    bp = blueprint(urza, "mlp")
    good = CompiledKernelArtifact(
        id=f"{bp.id[:12]}-cpu-fast-abcdef", blueprint_id=bp.id,
        compilation_pipeline=CompilationPipeline.FAST,
        interface=KernelInterface.parse("linear:8:8"), target="cpu", toolchain_hash="abcdef",
        kernel_binary_ref=urza.store.put(b"manifest"))
    with pytest.raises(BadInputError, match="PENDING_BENCHMARKING"):
        urza.add_kernel(good.model_copy(update={"status": KernelStatus.VALIDATED}), actor="f")
    with pytest.raises(BadInputError, match="does not match"):
        urza.add_kernel(good.model_copy(update={"target": "cuda"}), actor="f")
    with pytest.raises(NotFoundError, match="manifest blob"):
        urza.add_kernel(good.model_copy(update={"kernel_binary_ref": "1" * 64}), actor="f")
    orphan = "9" * 64
    with pytest.raises(NotFoundError, match=orphan):
        urza.add_kernel(good.model_copy(update={"blueprint_id": orphan,
                                                "id": f"{orphan[:12]}-cpu-fast-abcdef"}), actor="f")
    with pytest.raises(BadInputError, match="conv2d interface for a linear blueprint"):
        urza.add_kernel(good.model_copy(
            update={"interface": KernelInterface.parse("conv2d:3:8:1")}), actor="f")
    urza.set_blueprint_status(bp.id, "ARCHIVED", actor="op")
    with pytest.raises(IllegalTransitionError, match="ARCHIVED"):
        urza.add_kernel(good, actor="f")
    assert urza.list_kernels() == []


def test_verify_checks_manifests_against_the_forge_key(urza, workspace):
    k = kernel(urza, blueprint(urza, "mlp"))
    assert urza.verify().ok
    unsigned = urza.store.put(b"an unsigned manifest")
    bench_signed = urza.store.put(sign(b"manifest", workspace.private_key("bench"), "bench"))
    bp = urza.get_blueprint(k.blueprint_id)
    for n, ref in enumerate((unsigned, bench_signed)):
        urza.add_kernel(k.model_copy(update={"id": f"{bp.id[:12]}-cpu-fast-00000{n}",
                                             "kernel_binary_ref": ref, "tags": []}), actor="f")
    problems = urza.verify().problems
    assert len(problems) == 2
    assert "-cpu-fast-000000: manifest: not a signed document" in problems[0]
    assert "-cpu-fast-000001: manifest: signed by key" in problems[1]


def test_get_kernel_errors_name_the_id(urza):
    with pytest.raises(NotFoundError, match="abcdef012345-cpu-fast-abcdef"):
        urza.get_kernel("abcdef012345-cpu-fast-abcdef")
    with pytest.raises(NotFoundError):
        urza.get_kernel("no/such kernel")


def test_list_kernels_filters(urza):
    a, b = blueprint(urza, "a"), blueprint(urza, "b")
    ka = kernel(urza, a, tags=("fast",))
    kb = kernel(urza, b, target="cuda")
    assert urza.list_kernels() == [ka, kb]
    assert urza.list_kernels(blueprint_id=b.id) == [kb]
    assert urza.list_kernels(tag="fast") == [ka]
    assert urza.list_kernels(target="cuda", status="PENDING_BENCHMARKING") == [kb]
    assert urza.list_kernels(status=KernelStatus.VALIDATED) == []


# Validation: only the bench key --------------------------------------------------------------

def test_a_bench_signed_passing_report_validates_tags_and_measures(urza, workspace):
    k = kernel(urza, blueprint(urza, "mlp"), tags=("untested",))
    validated = urza.apply_validation_report(
        signed_report(workspace, k, latency=0.25, memory=3.5, tags=("fast", "low_memory")),
        actor="bench-1")
    assert validated.status is KernelStatus.VALIDATED
    assert validated.tags == ["fast", "low_memory"]
    assert validated.validation_report.benchmark_results == {LATENCY_MS: 0.25, MEMORY_MB: 3.5}
    row = next(urza.db.query("SELECT latency_ms, memory_mb FROM kernels WHERE id = ?", [k.id]))
    assert row == {"latency_ms": 0.25, "memory_mb": 3.5}
    last = next(urza.db.query("SELECT * FROM audit_log ORDER BY seq DESC LIMIT 1"))
    assert (last["action"], last["actor"]) == ("kernel.validated", "bench-1")
    assert json.loads(last["details"])["previous_tags"] == ["untested"]
    assert urza.verify().ok


def test_a_failing_report_rejects_with_its_reason(urza, workspace):
    k = kernel(urza, blueprint(urza, "mlp"))
    rejected = urza.apply_validation_report(signed_report(workspace, k, passed=False),
                                            actor="bench")
    assert rejected.status is KernelStatus.REJECTED
    assert rejected.status_reason == "NaN in backward pass"


def test_reports_not_signed_by_the_bench_key_are_refused(urza, workspace, tmp_path):
    k = kernel(urza, blueprint(urza, "mlp"))
    before = audit_actions(urza)
    with pytest.raises(IntegrityError, match="not the trusted key"):
        urza.apply_validation_report(signed_report(workspace, k, key="forge"), actor="bench")
    generate_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    report = json.loads(signed_report(workspace, k))["body"].encode()
    with pytest.raises(IntegrityError):
        urza.apply_validation_report(sign(report, load_private_key(tmp_path / "rogue.key"),
                                          signer="bench"), actor="bench")
    # A genuine bench signature over a failing report, edited to pass.
    document = json.loads(signed_report(workspace, k, passed=False))
    document["body"] = document["body"].replace('"passed_validation":false',
                                                '"passed_validation":true')
    assert '"passed_validation":true' in document["body"]
    with pytest.raises(IntegrityError, match="does not verify"):
        urza.apply_validation_report(json.dumps(document).encode(), actor="bench")
    with pytest.raises(IntegrityError, match="not a signed document"):
        urza.apply_validation_report(b"{}", actor="bench")
    assert urza.get_kernel(k.id).status is KernelStatus.PENDING_BENCHMARKING
    assert audit_actions(urza) == before
    assert urza.stats()["validation_reports"] == 0


def test_validated_is_never_set_directly(urza, workspace):
    k = kernel(urza, blueprint(urza, "mlp"))
    with pytest.raises(IllegalTransitionError, match="only a report signed by the bench key"):
        urza.set_kernel_status(k.id, KernelStatus.VALIDATED, actor="admin", reason="trust me")
    assert urza.get_kernel(k.id).status is KernelStatus.PENDING_BENCHMARKING


def test_a_report_must_match_the_catalog(urza, workspace):
    a, b = blueprint(urza, "a"), blueprint(urza, "b")
    k = kernel(urza, a)
    with pytest.raises(IntegrityError, match="names blueprint"):
        urza.apply_validation_report(signed_report(workspace, k, blueprint_id=b.id),
                                     actor="bench")
    ghost = f"{a.id[:12]}-cpu-fast-000000"
    with pytest.raises(NotFoundError, match=ghost):
        urza.apply_validation_report(signed_report(workspace, k, kernel_id=ghost), actor="bench")
    urza.apply_validation_report(signed_report(workspace, k), actor="bench")
    with pytest.raises(IllegalTransitionError, match="VALIDATED -> REJECTED"):
        urza.apply_validation_report(signed_report(workspace, k, passed=False), actor="bench")
    assert urza.get_kernel(k.id).status is KernelStatus.VALIDATED


def test_verify_rechecks_every_stored_report(urza, workspace):
    k = kernel(urza, blueprint(urza, "mlp"))
    urza.apply_validation_report(signed_report(workspace, k), actor="bench")
    blob = next(urza.db.query("SELECT signed_blob FROM validation_reports"))["signed_blob"]
    path = urza.store.path_for(blob)
    original = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(original.replace(b"latency", b"LATENCY"))
    problems = urza.verify().problems
    assert any(blob in p for p in problems)
    assert any(p.startswith("validation report 1") and blob in p for p in problems)
    path.write_bytes(original)
    assert urza.verify().ok


def test_verify_finds_a_stored_report_the_bench_did_not_sign(urza, workspace):
    k = kernel(urza, blueprint(urza, "mlp"))
    urza.apply_validation_report(signed_report(workspace, k), actor="bench")
    # Someone with write access swaps in a forge-signed document, stored as a proper blob.
    forged = urza.store.put(signed_report(workspace, k, key="forge"))
    conn = sqlite3.connect(workspace.db_path)
    conn.execute("DROP TRIGGER validation_reports_append_only")
    conn.execute("UPDATE validation_reports SET signed_blob = ?", (forged,))
    conn.commit()
    conn.close()
    problems = urza.verify().problems
    assert len(problems) == 1 and "not the trusted key" in problems[0]


def signed_refresh(workspace: Workspace, tags: dict[str, list[str]], *, key: str = "bench",
                   target: str = "cpu") -> bytes:
    refresh = UrabraskTagRefresh(target=target, tags=tags, population=len(tags),
                                 policy="percentile")
    return sign(refresh.to_json().encode(), workspace.private_key(key), signer=key)


def test_a_bench_signed_tag_refresh_retags_validated_kernels(urza, workspace):
    bp = blueprint(urza, "mlp")
    a, b = (urza.apply_validation_report(signed_report(workspace, kernel(urza, bp, variant=v),
                                                       tags=("medium_speed",)), actor="bench")
            for v in "ab")
    changed = urza.apply_tag_refresh(
        signed_refresh(workspace, {a.id: ["high_speed", "low_memory"], b.id: ["medium_speed"]}),
        actor="bench-1")
    assert changed == {a.id: ["medium_speed"]}  # b's tags did not change
    assert urza.get_kernel(a.id).tags == ["high_speed", "low_memory"]
    assert [k.id for k in urza.list_kernels(tag="low_memory")] == [a.id]
    assert [k.id for k in urza.query_kernels(KernelQuery(required_tags=["low_memory"]))
            .matching_kernels] == [a.id]
    last = next(urza.db.query("SELECT * FROM audit_log ORDER BY seq DESC LIMIT 1"))
    assert (last["action"], last["actor"]) == ("kernel.retagged", "bench-1")
    assert json.loads(last["details"])["kernels"] == {
        a.id: {"from": ["medium_speed"], "to": ["high_speed", "low_memory"]}}
    assert urza.verify().ok


def test_a_tag_refresh_needs_the_bench_key_and_validated_kernels_of_its_target(urza, workspace):
    bp = blueprint(urza, "mlp")
    good = urza.apply_validation_report(signed_report(workspace, kernel(urza, bp, variant="a")),
                                        actor="bench")
    pending = kernel(urza, bp, variant="b")
    before = audit_actions(urza)
    with pytest.raises(IntegrityError, match="not the trusted key"):
        urza.apply_tag_refresh(signed_refresh(workspace, {good.id: ["x"]}, key="forge"),
                               actor="bench")
    # All or nothing: one kernel that is not VALIDATED refuses the whole refresh.
    with pytest.raises(IntegrityError, match="only VALIDATED kernels"):
        urza.apply_tag_refresh(signed_refresh(workspace, {good.id: ["x"], pending.id: ["y"]}),
                               actor="bench")
    with pytest.raises(IntegrityError, match="only VALIDATED kernels of that target"):
        urza.apply_tag_refresh(signed_refresh(workspace, {good.id: ["x"]}, target="h100"),
                               actor="bench")
    ghost = f"{bp.id[:12]}-cpu-fast-000000"
    with pytest.raises(NotFoundError, match=ghost):
        urza.apply_tag_refresh(signed_refresh(workspace, {ghost: ["x"]}), actor="bench")
    assert urza.get_kernel(good.id).tags == [] and audit_actions(urza) == before


def test_verify_finds_a_tag_refresh_the_bench_did_not_sign(urza, workspace):
    k = urza.apply_validation_report(signed_report(workspace, kernel(urza, blueprint(urza, "m"))),
                                     actor="bench")
    urza.apply_tag_refresh(signed_refresh(workspace, {k.id: ["high_speed"]}), actor="bench")
    assert urza.verify().ok
    forged = urza.store.put(signed_refresh(workspace, {k.id: ["high_speed"]}, key="forge"))
    conn = sqlite3.connect(workspace.db_path)
    row = conn.execute("SELECT seq, details FROM audit_log WHERE action = 'kernel.retagged'").fetchone()
    details = json.loads(row[1]) | {"refresh_blob": forged}
    conn.execute("DROP TRIGGER audit_log_append_only")
    conn.execute("UPDATE audit_log SET details = ? WHERE seq = ?", (json.dumps(details), row[0]))
    conn.commit()
    conn.close()
    problems = urza.verify().problems
    assert any("tag refresh" in p and "not the trusted key" in p for p in problems)


def _kernel_in(urza: Urza, workspace: Workspace, status: KernelStatus) -> CompiledKernelArtifact:
    k = kernel(urza, blueprint(urza, "mlp"))
    if status is KernelStatus.VALIDATED:
        return urza.apply_validation_report(signed_report(workspace, k), actor="bench")
    if status is not KernelStatus.PENDING_BENCHMARKING:
        return urza.set_kernel_status(k.id, status, actor="op", reason="setup")
    return k


@pytest.mark.parametrize("old", list(KernelStatus))
@pytest.mark.parametrize("new", [s for s in KernelStatus if s is not KernelStatus.VALIDATED])
def test_kernel_status_machine(urza, workspace, old, new):
    k = _kernel_in(urza, workspace, old)
    assert k.status is old
    if new in KERNEL_TRANSITIONS[old]:
        changed = urza.set_kernel_status(k.id, new, actor="op", reason="curation")
        assert changed.status is new and changed.status_reason == "curation"
        assert audit_actions(urza)[-1] == "kernel.status"
    else:
        before = audit_actions(urza)
        with pytest.raises(IllegalTransitionError, match=f"{old.value} -> {new.value}"):
            urza.set_kernel_status(k.id, new, actor="op", reason="curation")
        assert urza.get_kernel(k.id) == k
        assert audit_actions(urza) == before


# The bench's queue ----------------------------------------------------------------------------

def test_kernel_claims_keep_the_status_and_respect_leases_and_targets(urza, workspace):
    bp = blueprint(urza, "mlp")
    gpu = kernel(urza, bp, target="cuda")
    cpu = kernel(urza, bp, target="cpu")
    assert urza.claim_next_kernel("cpu-bench", 60, targets=["cpu"]).id == cpu.id
    assert urza.claim_next_kernel("cpu-bench-2", 60, targets=["cpu"]) is None
    claimed = urza.claim_next_kernel("gpu-bench", 0.2)
    assert claimed.id == gpu.id and claimed.status is KernelStatus.PENDING_BENCHMARKING
    assert urza.claim_next_kernel("other", 60) is None
    time.sleep(0.3)
    assert urza.claim_next_kernel("other", 60).id == gpu.id  # the expired lease went back
    assert not urza.renew_kernel_lease(gpu.id, "gpu-bench", 60)
    assert not urza.release_kernel(gpu.id, "gpu-bench")
    with pytest.raises(IllegalTransitionError, match="not claimed by 'gpu-bench'"):
        urza.set_kernel_status(gpu.id, KernelStatus.REJECTED, actor="gpu-bench",
                               reason="crashed", worker="gpu-bench")
    assert urza.renew_kernel_lease(gpu.id, "other", 60)
    assert urza.release_kernel(gpu.id, "other")
    assert urza.claim_next_kernel("third", 60).id == gpu.id
    # A verdict ends the claim: the kernel leaves the queue.
    urza.apply_validation_report(signed_report(workspace, cpu), actor="cpu-bench")
    assert urza.claim_next_kernel("fourth", 60, targets=["cpu"]) is None
    actions = audit_actions(urza)
    assert actions.count("kernel.lease_expired") == 1 and actions.count("kernel.released") == 1


# KernelQuery ----------------------------------------------------------------------------------

@pytest.fixture
def population(urza, workspace):
    """A synthetic library: (name -> kernel id). Only the ones given a report are VALIDATED."""
    a, b = blueprint(urza, "a"), blueprint(urza, "b")
    conv = blueprint(urza, "conv", LayerKind.CONV2D)
    specs = {
        # name: (blueprint, kernel kwargs, report kwargs or None for pending)
        "fast_small": (a, {}, {"tags": ("fast", "low_memory"), "latency": 2.0, "memory": 10.0}),
        "fastest": (a, {"variant": "2"}, {"tags": ("fast",), "latency": 1.0, "memory": 50.0}),
        "stable_small": (b, {"pipeline": CompilationPipeline.STANDARD},
                         {"tags": ("low_memory", "stable"), "latency": 3.0, "memory": 5.0}),
        "unmeasured": (b, {}, {"tags": ("stable",), "latency": None, "memory": None}),
        "unmeasured_2": (b, {"variant": "2"}, {"tags": ("stable",), "latency": None,
                                               "memory": None}),
        "on_gpu": (a, {"target": "cuda"}, {"tags": ("fast",), "latency": 0.5}),
        "narrow": (a, {"interface": "linear:64:16"}, {"tags": ("fast",), "latency": 0.1}),
        "bf16": (a, {"dtype": "bfloat16"}, {"tags": ("fast",), "latency": 0.2}),
        "pending": (a, {"variant": "3"}, None),
        "rejected": (b, {"variant": "3"}, {"passed": False, "tags": ("fast",), "latency": 0.05}),
        "conv": (conv, {"interface": "conv2d:3:8:2"}, {"tags": ("fast",), "latency": 4.0}),
    }
    ids = {}
    for name, (bp, kernel_kwargs, report_kwargs) in specs.items():
        k = kernel(urza, bp, **kernel_kwargs, tags=("fast",) if report_kwargs is None else ())
        if report_kwargs is not None:
            urza.apply_validation_report(signed_report(workspace, k, **report_kwargs),
                                         actor="bench")
        ids[name] = k.id
    ids["blueprint_b"] = b.id
    return ids


def _names(urza: Urza, population: dict[str, str], **query) -> list[str]:
    by_id = {v: k for k, v in population.items()}
    result = urza.query_kernels(KernelQuery(**query))
    assert all(k.status is KernelStatus.VALIDATED for k in result.matching_kernels)
    return [by_id[k.id] for k in result.matching_kernels]


SEED_FIT = {"interface": KernelInterface.parse("linear:64:32"), "target": "cpu",
            "dtype": "float32"}


def _unmeasured(population) -> list[str]:
    """The two kernels without latency, in id order (the last tie-breaker)."""
    return sorted(["unmeasured", "unmeasured_2"], key=population.get)


def test_query_returns_validated_kernels_only_ranked_by_latency(urza, population):
    everything = _names(urza, population)
    assert everything == ["narrow", "bf16", "on_gpu", "fastest", "fast_small", "stable_small",
                          "conv", *_unmeasured(population)]


def test_query_filters_by_interface_target_dtype_pipeline_and_blueprint(urza, population):
    assert _names(urza, population, **SEED_FIT) == ["fastest", "fast_small", "stable_small",
                                                    *_unmeasured(population)]
    assert _names(urza, population, target="cuda") == ["on_gpu"]
    assert _names(urza, population, dtype="bfloat16") == ["bf16"]
    assert _names(urza, population, pipeline=CompilationPipeline.STANDARD) == ["stable_small"]
    assert _names(urza, population, interface=KernelInterface.parse("conv2d:3:8:2")) == ["conv"]
    assert _names(urza, population, interface=KernelInterface.parse("conv2d:3:8:1")) == []
    assert _names(urza, population, blueprint_id=population["blueprint_b"]) == [
        "stable_small", *_unmeasured(population)]


def test_query_required_and_excluded_tags(urza, population):
    assert _names(urza, population, **SEED_FIT, required_tags=["fast"]) == ["fastest",
                                                                            "fast_small"]
    assert _names(urza, population, **SEED_FIT,
                  required_tags=["fast", "low_memory", "fast"]) == ["fast_small"]
    assert _names(urza, population, **SEED_FIT, excluded_tags=["fast"]) == [
        "stable_small", *_unmeasured(population)]
    assert _names(urza, population, **SEED_FIT, required_tags=["low_memory"],
                  excluded_tags=["stable"]) == ["fast_small"]
    assert _names(urza, population, **SEED_FIT, required_tags=["nonexistent"]) == []


def test_query_caps_exclude_unmeasured_kernels(urza, population):
    assert _names(urza, population, **SEED_FIT, max_latency_ms=2.0) == ["fastest", "fast_small"]
    assert _names(urza, population, **SEED_FIT, max_memory_mb=10.0) == ["fast_small",
                                                                        "stable_small"]
    assert _names(urza, population, **SEED_FIT, max_latency_ms=2.5, max_memory_mb=20) == [
        "fast_small"]


def test_query_ranks_by_preferred_tags_then_latency(urza, population):
    assert _names(urza, population, **SEED_FIT, preferred_tags=["low_memory"]) == [
        "fast_small", "stable_small", "fastest", *_unmeasured(population)]
    assert _names(urza, population, **SEED_FIT, preferred_tags=["low_memory", "stable"]) == [
        "stable_small", "fast_small", *_unmeasured(population), "fastest"]
    assert _names(urza, population, **SEED_FIT, preferred_tags=["low_memory"], limit=2) == [
        "fast_small", "stable_small"]


def test_query_sees_archived_kernels_no_more(urza, population):
    urza.set_kernel_status(population["fastest"], KernelStatus.ARCHIVED, actor="curator",
                           reason="superseded")
    assert "fastest" not in _names(urza, population, **SEED_FIT)


def test_kernel_rows_are_never_deleted(urza, population):
    with pytest.raises(sqlite3.DatabaseError, match="never deleted"):
        urza.db.execute("DELETE FROM kernels")
