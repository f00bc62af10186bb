"""Compiled kernels in the catalog: registration, the bench's work queue, validation and queries.

The one road to VALIDATED is `apply_validation_report` with a report signed by the workspace's
bench key (DESIGN.md section 5): no status setter, no flag, no actor can take another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from esper.contracts import (
    KERNEL_TRANSITIONS,
    LATENCY_MS,
    MEMORY_MB,
    BlueprintStatus,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
    KernelQuery,
    KernelQueryResult,
    KernelStatus,
    LayerKind,
    UrabraskTagRefresh,
    UrabraskValidationReport,
)
from esper.errors import (
    BadInputError,
    EsperError,
    IllegalTransitionError,
    IntegrityError,
    NotFoundError,
)
from esper.signing import open_signed
from esper.urza.leases import LeaseCatalog, LeaseQueue
from esper.urza.query import kernel_query_sql
from esper.urza.rows import KERNEL_SELECT, kernel_from_row, prefix_pattern
from esper.urza.values import (
    canonical_json,
    lease_window,
    now_iso,
    parse_enum,
    require_text,
    to_iso,
)

# Blueprints that may receive new kernels: not ones found INVALID or ARCHIVED.
_BLUEPRINTS_TAKING_KERNELS = {BlueprintStatus.UNVALIDATED.value, BlueprintStatus.COMPILING.value,
                              BlueprintStatus.COMPILED.value}

# The bench's queue: a claimed kernel stays PENDING_BENCHMARKING; its lease is the claim.
_BENCH_QUEUE = LeaseQueue(
    table="kernels", subject="kernel", held_status="PENDING_BENCHMARKING",
    waiting="status = 'PENDING_BENCHMARKING'"
            " AND (claimed_by IS NULL OR lease_until IS NULL OR lease_until < :now)")

_LOAD_RECORD_SELECT = """
SELECT k.id, k.blueprint_id, k.status, k.status_reason, k.pipeline, k.interface_kind,
       k.in_features, k.out_features, k.stride, k.target, k.dtype, k.toolchain_hash,
       k.kernel_binary_ref, r.signed_blob
  FROM kernels k
  LEFT JOIN validation_reports r ON r.id = k.validation_report_id
 WHERE k.id = ?
"""


@dataclass(frozen=True)
class KernelLoadRecord:
    """What the verifying loader checks a kernel's signed documents against: the catalog row's
    identity, status, interface and blob references, and the blob of its applied validation
    report (None if no report was applied). Read in one query, with no tags and no report body:
    the loader verifies and parses the signed report itself."""

    id: str
    blueprint_id: str
    status: KernelStatus
    status_reason: str | None
    pipeline: CompilationPipeline
    interface: KernelInterface
    target: str
    dtype: str
    toolchain_hash: str
    kernel_binary_ref: str
    report_blob: str | None


class KernelCatalog(LeaseCatalog):
    # Registration -----------------------------------------------------------------------------
    def add_kernel(self, artifact: CompiledKernelArtifact, *,
                   actor: str) -> tuple[CompiledKernelArtifact, bool]:
        """Register a freshly compiled artifact (PENDING_BENCHMARKING, no report yet).

        Its blueprint must be in the catalog and its signed manifest (`kernel_binary_ref`) in
        the store. A known id changes nothing and returns the existing record with False.
        """
        if not isinstance(artifact, CompiledKernelArtifact):
            raise BadInputError(f"add_kernel takes a CompiledKernelArtifact, not "
                                f"{type(artifact).__name__}")
        require_text(actor, "actor")
        if artifact.status is not KernelStatus.PENDING_BENCHMARKING:
            raise BadInputError(f"kernel {artifact.id}: a new kernel is PENDING_BENCHMARKING, not "
                                f"{artifact.status.value} (only a bench-signed report validates)")
        if artifact.validation_report is not None:
            raise BadInputError(f"kernel {artifact.id}: a new kernel carries no validation report; "
                                "apply the signed report with apply_validation_report")
        expected = (f"{artifact.blueprint_id[:12]}-{artifact.target}-"
                    f"{artifact.compilation_pipeline.value}-")
        if not artifact.id.startswith(expected):
            raise BadInputError(f"kernel id {artifact.id!r} does not match its blueprint, target "
                                f"and pipeline (expected {expected}<config hash>)")
        if not self.store.has(artifact.kernel_binary_ref):
            raise NotFoundError(f"kernel {artifact.id}: manifest blob {artifact.kernel_binary_ref} "
                                "is not in the artifact store; put it there first")
        with self.transaction():
            existing = self._kernel_row(artifact.id)
            if existing is not None:
                return kernel_from_row(existing), False
            blueprint = self._row("SELECT status, interface_kind FROM blueprints WHERE id = ?",
                                  (artifact.blueprint_id,))
            if blueprint is None:
                raise NotFoundError(f"kernel {artifact.id}: blueprint {artifact.blueprint_id} is "
                                    "not in the catalog")
            if blueprint["status"] not in _BLUEPRINTS_TAKING_KERNELS:
                raise IllegalTransitionError(f"kernel {artifact.id}: blueprint "
                                             f"{artifact.blueprint_id} is {blueprint['status']}")
            if blueprint["interface_kind"] != artifact.interface.kind.value:
                raise BadInputError(f"kernel {artifact.id}: a {artifact.interface.kind.value} "
                                    f"interface for a {blueprint['interface_kind']} blueprint")
            created = to_iso(artifact.created_at)
            face = artifact.interface
            self._execute(
                "INSERT INTO kernels (id, blueprint_id, status, status_reason, pipeline,"
                " interface_kind, in_features, out_features, stride, target, dtype,"
                " toolchain_hash, kernel_binary_ref, compilation, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (artifact.id, artifact.blueprint_id, artifact.status.value, artifact.status_reason,
                 artifact.compilation_pipeline.value, face.kind.value, face.in_features,
                 face.out_features, face.stride, artifact.target, artifact.dtype,
                 artifact.toolchain_hash, artifact.kernel_binary_ref,
                 artifact.compilation.to_json() if artifact.compilation else None,
                 created, created))
            self._replace_tags(artifact.id, artifact.tags)
            self.audit(actor, "kernel.added", artifact.id,
                       {"blueprint_id": artifact.blueprint_id, "interface": str(face),
                        "target": artifact.target, "dtype": artifact.dtype,
                        "pipeline": artifact.compilation_pipeline.value,
                        "kernel_binary_ref": artifact.kernel_binary_ref})
            return kernel_from_row(self._kernel_row(artifact.id)), True

    # Lookup ---------------------------------------------------------------------------------
    def get_kernel(self, id_or_prefix: str) -> CompiledKernelArtifact:
        """A kernel by id or unique prefix, with its tags and applied validation report."""
        return kernel_from_row(self._resolve_kernel(id_or_prefix))

    def kernel_load_record(self, id_or_prefix: str) -> KernelLoadRecord:
        """The catalog's facts a kernel load is checked against, by id or unique prefix (as
        `get_kernel`), in one query: a kernel load's only catalog read."""
        row = None
        if isinstance(id_or_prefix, str):
            row = self.db.conn.execute(_LOAD_RECORD_SELECT, (id_or_prefix,)).fetchone()
        if row is None:  # a prefix, or no such kernel (NotFoundError, as get_kernel)
            kernel_id = self._resolve_kernel(id_or_prefix)["id"]
            row = self.db.conn.execute(_LOAD_RECORD_SELECT, (kernel_id,)).fetchone()
        (kernel_id, blueprint_id, status, reason, pipeline, kind, in_features, out_features,
         stride, target, dtype, toolchain_hash, binary_ref, report_blob) = row
        try:
            return KernelLoadRecord(
                id=kernel_id, blueprint_id=blueprint_id, status=KernelStatus(status),
                status_reason=reason, pipeline=CompilationPipeline(pipeline),
                interface=KernelInterface(kind=LayerKind(kind), in_features=in_features,
                                          out_features=out_features, stride=stride),
                target=target, dtype=dtype, toolchain_hash=toolchain_hash,
                kernel_binary_ref=binary_ref, report_blob=report_blob)
        except (ValueError, BadInputError) as e:  # pydantic's ValidationError is a ValueError
            raise IntegrityError(f"urza.db kernel {kernel_id}: {e}") from None

    def list_kernels(self, status: KernelStatus | str | None = None,
                     blueprint_id: str | None = None, tag: str | None = None,
                     target: str | None = None) -> list[CompiledKernelArtifact]:
        """Kernels in registration order, any status."""
        where, params = [], []
        if status is not None:
            where.append("k.status = ?")
            params.append(parse_enum(KernelStatus, status, "kernel status").value)
        if blueprint_id is not None:
            where.append("k.blueprint_id = ?")
            params.append(blueprint_id)
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM kernel_tags t WHERE t.kernel_id = k.id"
                         " AND t.tag = ?)")
            params.append(tag)
        if target is not None:
            where.append("k.target = ?")
            params.append(target)
        sql = KERNEL_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        return [kernel_from_row(r)
                for r in self._rows(sql + " ORDER BY k.created_at, k.rowid", tuple(params))]

    def query_kernels(self, q: KernelQuery) -> KernelQueryResult:
        """Tamiyo's question: the VALIDATED kernels that fit, best first (preferred tags carried,
        then measured latency; unmeasured last)."""
        if not isinstance(q, KernelQuery):
            raise BadInputError(f"query_kernels takes a KernelQuery, not {type(q).__name__}")
        sql, params = kernel_query_sql(q)
        return KernelQueryResult(matching_kernels=[kernel_from_row(r)
                                                   for r in self._rows(sql, params)])

    # Status ---------------------------------------------------------------------------------
    def set_kernel_status(self, kernel_id: str, new: KernelStatus, *, actor: str, reason: str,
                          worker: str | None = None) -> CompiledKernelArtifact:
        """REJECTED or ARCHIVED along KERNEL_TRANSITIONS. Never VALIDATED: that takes a report
        signed by the bench key (`apply_validation_report`). `worker`: as for blueprints, the
        change is refused unless that bench worker still holds the claim."""
        new = parse_enum(KernelStatus, new, "kernel status")
        require_text(actor, "actor")
        require_text(reason, "reason", max_length=2000)
        if new is KernelStatus.VALIDATED:
            raise IllegalTransitionError("only a report signed by the bench key can validate a "
                                         "kernel (apply_validation_report)")
        with self.transaction():
            row = self._resolve_kernel(kernel_id)
            old = KernelStatus(row["status"])
            self._check_transition(row["id"], old, new)
            if worker is not None and row["claimed_by"] != worker:
                raise IllegalTransitionError(f"kernel {row['id']} is not claimed by {worker!r} "
                                             f"(claimed by {row['claimed_by']!r})")
            self._execute(
                "UPDATE kernels SET status = ?, status_reason = ?, updated_at = ?,"
                " claimed_by = NULL, lease_until = NULL WHERE id = ? AND status = ?",
                (new.value, reason, now_iso(), row["id"], old.value))
            self.audit(actor, "kernel.status", row["id"],
                       {"from": old.value, "to": new.value, "reason": reason,
                        "claimed_by": row["claimed_by"]})
            return kernel_from_row(self._kernel_row(row["id"]))

    def apply_validation_report(self, signed_report: bytes, *,
                                actor: str) -> CompiledKernelArtifact:
        """Apply Urabrask's verdict: VALIDATED if it passed, else REJECTED with its reason.

        The document must verify against this workspace's bench public key (IntegrityError
        otherwise); the body parsed is the very buffer that was verified. The signed document is
        kept in the store, the kernel's tags become the report's generated tags, and its
        latency and memory are kept in columns for queries.
        """
        require_text(actor, "actor")
        if not isinstance(signed_report, bytes):
            raise BadInputError("a signed validation report must be bytes")
        body = open_signed(signed_report, self.workspace.public_key("bench"),
                           what="validation report")
        report = UrabraskValidationReport.from_json(body, source="validation report")
        blob = self.store.put(signed_report)
        with self.transaction():
            row = self._kernel_row(report.kernel_artifact_id)
            if row is None:
                raise NotFoundError(f"validation report names kernel {report.kernel_artifact_id}, "
                                    "which is not in the catalog")
            if row["blueprint_id"] != report.blueprint_id:
                raise IntegrityError(f"validation report for kernel {row['id']} names blueprint "
                                     f"{report.blueprint_id}; the catalog says "
                                     f"{row['blueprint_id']}")
            old = KernelStatus(row["status"])
            new = KernelStatus.VALIDATED if report.passed_validation else KernelStatus.REJECTED
            self._check_transition(row["id"], old, new)
            report_id = self._scalar(
                "INSERT INTO validation_reports (kernel_id, signed_blob, body, passed, applied_at,"
                " applied_by) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (row["id"], blob, body.decode("utf-8"), int(report.passed_validation), now_iso(),
                 actor))
            latency = report.benchmark_results.get(LATENCY_MS)
            memory = report.benchmark_results.get(MEMORY_MB)
            self._execute(
                "UPDATE kernels SET status = ?, status_reason = ?, latency_ms = ?, memory_mb = ?,"
                " validation_report_id = ?, updated_at = ?, claimed_by = NULL, lease_until = NULL"
                " WHERE id = ?",
                (new.value, report.rejection_reason, latency, memory, report_id, now_iso(),
                 row["id"]))
            previous_tags = self._tags(row["id"])
            self._replace_tags(row["id"], report.generated_tags)
            self.audit(actor, "kernel.validated" if report.passed_validation else "kernel.rejected",
                       row["id"],
                       {"report_blob": blob, "from": old.value, "to": new.value,
                        "reason": report.rejection_reason,
                        "tags": sorted(set(report.generated_tags)),
                        "previous_tags": previous_tags, LATENCY_MS: latency, MEMORY_MB: memory})
            return kernel_from_row(self._kernel_row(row["id"]))

    def apply_tag_refresh(self, signed_refresh: bytes, *, actor: str) -> dict[str, list[str]]:
        """Re-tag VALIDATED kernels as their target's population grows (UrabraskTagRefresh).

        Like a validation report, the document must verify against the bench public key and is
        kept in the store; every kernel it names must be VALIDATED on its target, or nothing is
        applied. A refresh computed against fewer peers than the target has now is stale (another
        bench validated a kernel since: its own refresh, computed after, is the current one) and
        is refused with an EsperError, nothing applied. Returns kernel id -> previous tags for
        the kernels whose tags changed.
        """
        require_text(actor, "actor")
        if not isinstance(signed_refresh, bytes):
            raise BadInputError("a signed tag refresh must be bytes")
        body = open_signed(signed_refresh, self.workspace.public_key("bench"),
                           what="tag refresh")
        refresh = UrabraskTagRefresh.from_json(body, source="tag refresh")
        blob = self.store.put(signed_refresh)
        changed: dict[str, list[str]] = {}
        with self.transaction():
            peers = self._scalar("SELECT count(*) FROM kernels WHERE status = 'VALIDATED'"
                                 " AND target = ?", (refresh.target,)) - 1
            if refresh.population < peers:
                raise EsperError(f"tag refresh for target {refresh.target} was computed against "
                                 f"{refresh.population} peers; each kernel now has {peers}: a "
                                 "kernel was validated since, and its bench re-tags against it")
            for kernel_id, tags in sorted(refresh.tags.items()):
                row = self._kernel_row(kernel_id)
                if row is None:
                    raise NotFoundError(f"tag refresh names kernel {kernel_id}, which is not in "
                                        "the catalog")
                if row["status"] != KernelStatus.VALIDATED.value or row["target"] != refresh.target:
                    raise IntegrityError(f"tag refresh for target {refresh.target} names kernel "
                                         f"{kernel_id} ({row['status']} on {row['target']}); "
                                         "only VALIDATED kernels of that target are re-tagged")
                previous = self._tags(kernel_id)
                if previous != sorted(set(tags)):
                    self._replace_tags(kernel_id, tags)
                    changed[kernel_id] = previous
            if changed:
                self.audit(actor, "kernel.retagged", refresh.target,
                           {"refresh_blob": blob, "policy": refresh.policy,
                            "population": refresh.population,
                            "kernels": {k: {"from": changed[k],
                                            "to": sorted(set(refresh.tags[k]))}
                                        for k in sorted(changed)}})
        return changed

    # The bench's queue ------------------------------------------------------------------------
    def claim_next_kernel(self, worker: str, lease_seconds: float, *,
                          targets: Iterable[str] | None = None,
                          exclude: Iterable[str] = ()) -> CompiledKernelArtifact | None:
        """Take the oldest PENDING_BENCHMARKING kernel nobody holds (or whose holder's lease
        expired), or None. `targets`: only kernels for these devices (a CPU-only bench cannot
        measure a CUDA kernel). `exclude`: kernel ids to pass over (those whose blobs the bench
        found damaged). The status stays PENDING_BENCHMARKING while claimed."""
        require_text(worker, "worker")
        now, until = lease_window(lease_seconds)
        params: dict[str, Any] = {"worker": worker, "until": until, "now": now,
                                  "now_iso": now_iso()}
        also_where = ""
        if targets is not None:
            params["targets"] = canonical_json(sorted(set(targets)))
            also_where = " AND target IN (SELECT value FROM json_each(:targets))"
        exclude = sorted(set(exclude))
        if exclude:
            params["exclude"] = canonical_json(exclude)
            also_where += " AND id NOT IN (SELECT value FROM json_each(:exclude))"
        with self.transaction():
            claimed_id = self._take_lease(_BENCH_QUEUE, worker, until, params,
                                          also_where=also_where)
            if claimed_id is None:
                return None
            return kernel_from_row(self._kernel_row(claimed_id))

    def renew_kernel_lease(self, kernel_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend `worker`'s claim; False if the claim is no longer its own."""
        return self._renew_lease(_BENCH_QUEUE, self._resolve_kernel, kernel_id, worker,
                                 lease_seconds)

    def release_kernel(self, kernel_id: str, worker: str) -> bool:
        """Give a claim back unbenchmarked; False if `worker` no longer held it."""
        return self._release_lease(_BENCH_QUEUE, self._resolve_kernel, kernel_id, worker)

    # Internals ------------------------------------------------------------------------------
    @staticmethod
    def _check_transition(kernel_id: str, old: KernelStatus, new: KernelStatus) -> None:
        if new not in KERNEL_TRANSITIONS[old]:
            allowed = ", ".join(sorted(s.value for s in KERNEL_TRANSITIONS[old])) or "none"
            raise IllegalTransitionError(f"kernel {kernel_id}: {old.value} -> {new.value} is not "
                                         f"allowed (from {old.value}: {allowed})")

    def _tags(self, kernel_id: str) -> list[str]:
        return [r["tag"] for r in self._rows(
            "SELECT tag FROM kernel_tags WHERE kernel_id = ? ORDER BY tag", (kernel_id,))]

    def _replace_tags(self, kernel_id: str, tags: Iterable[str]) -> None:
        self._require_write_transaction()
        self._execute("DELETE FROM kernel_tags WHERE kernel_id = ?", (kernel_id,))
        self.db.conn.executemany("INSERT INTO kernel_tags (kernel_id, tag) VALUES (?, ?)",
                                 [(kernel_id, tag) for tag in sorted(set(tags))])

    def _kernel_row(self, kernel_id: str) -> dict[str, Any] | None:
        return self._row(KERNEL_SELECT + " WHERE k.id = ?", (kernel_id,))

    def _resolve_kernel(self, id_or_prefix: str, *, exact: bool = False) -> dict[str, Any]:
        """The row named by a full id or (unless `exact`) by a unique prefix."""
        row = self._kernel_row(id_or_prefix) if isinstance(id_or_prefix, str) else None
        if row is not None:
            return row
        pattern = None if exact else prefix_pattern(id_or_prefix, "kernel")
        if pattern is not None:
            rows = self._rows(KERNEL_SELECT + " WHERE k.id GLOB ? ORDER BY k.id LIMIT 6",
                              (pattern,))
            if len(rows) == 1:
                return rows[0]
            if len(rows) > 1:
                shown = ", ".join(r["id"] for r in rows[:5])
                raise BadInputError(f"kernel id prefix {id_or_prefix!r} is ambiguous: it matches "
                                    f"{shown}{', ...' if len(rows) > 5 else ''}")
        raise NotFoundError(f"no kernel with id {id_or_prefix!r}")
