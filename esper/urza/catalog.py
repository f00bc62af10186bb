"""`Urza`: the catalog and artifact store of one workspace, behind one object.

    with Urza.open(workspace) as urza:
        blueprint, created = urza.add_blueprint(ir_bytes, name="mlp",
                                                interface_kind=LayerKind.LINEAR, actor="library")
        job = urza.claim_next_blueprint("forge-1", lease_seconds=60)

One `Urza` is one SQLite connection: use it from one thread, and open one per process (or per
thread). Any number of processes may open the same workspace at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from esper.contracts import UrabraskTagRefresh, UrabraskValidationReport
from esper.errors import BadInputError, EsperError, IntegrityError, NotFoundError
from esper.signing import Ed25519PublicKey, open_signed
from esper.urza.audit import AuditCheck, verify_chain, verify_tail
from esper.urza.blueprints import BlueprintCatalog
from esper.urza.db import BUSY_TIMEOUT_S, connect, file_error
from esper.urza.kernels import KernelCatalog
from esper.urza.migrations import LATEST_VERSION, applied_version, migrate
from esper.urza.records import RecordCatalog
from esper.urza.store import ArtifactStore, is_digest, sha256_hex
from esper.urza.values import now_iso, require_text
from esper.workspace import KEY_ROLES, KeyRole, Workspace


@dataclass(frozen=True)
class VerifyReport:
    """What `esper library verify` found: an empty `problems` list means all is sound."""

    audit: AuditCheck
    blobs_checked: int
    reports_checked: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Urza(BlueprintCatalog, KernelCatalog, RecordCatalog):
    @classmethod
    def open(cls, workspace: Workspace, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Urza:
        """Open the workspace's catalog, creating its schema in a new workspace or migrating it.

        Only a workspace that never had a catalog gets a new one (`Workspace.catalog_evidence`):
        elsewhere a missing, empty or table-less urza.db is an IntegrityError, and nothing is
        created. A damaged file is an IntegrityError, an unwritable one an EsperError, each
        naming the file."""
        workspace.require()
        _refuse_replacing_catalog(workspace, _catalog_file_state(workspace.db_path),
                                  look_again=True)
        try:
            db = connect(workspace.db_path, busy_timeout_s)
        except sqlite3.Error as e:
            error = file_error(workspace.db_path, e)
            if error is None:
                raise
            raise error from e
        urza = cls(workspace, db, ArtifactStore(workspace.artifacts_dir))
        try:
            # Check before locking: the common case (schema current) takes no write lock.
            if applied_version(db) != LATEST_VERSION:
                with urza.transaction():
                    if applied_version(db) == 0:
                        _refuse_replacing_catalog(workspace, "a database with no tables")
                    created = migrate(db)[:1] == [1]
                if created:
                    workspace.record_catalog_created()
        except BaseException as e:
            db.conn.close()
            if isinstance(e, sqlite3.Error) and (error := urza.file_error(e)) is not None:
                raise error from e
            raise
        return urza

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        # A page found damaged mid-command, a write refused: one line naming the file.
        if isinstance(exc, sqlite3.Error) and (error := self.file_error(exc)) is not None:
            raise error from exc

    # Idempotent consumers ---------------------------------------------------------------------
    def run_once(self, group: str, event_id: str, effect: Callable[[], None]) -> bool:
        """Apply `effect` for (group, event_id) at most once, ever.

        The event is marked processed and the effect's catalog writes commit in one
        transaction: if `effect` raises, neither happens and the exception propagates (the bus
        will redeliver). Returns False, without calling `effect`, for an event already processed.
        """
        require_text(group, "consumer group")
        require_text(event_id, "event id")
        with self.transaction():
            cursor = self._execute(
                "INSERT INTO processed_events (consumer_group, event_id, processed_at)"
                " VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (group, event_id, now_iso()))
            if cursor.rowcount != 1:
                return False
            effect()
            return True

    # Integrity ------------------------------------------------------------------------------
    def audit_rows(self, *, subjects: Iterable[str] = (), seqs: Iterable[int] = ()
                   ) -> list[dict[str, Any]]:
        """Audit-log rows about any of `subjects` or with any of `seqs`, in chain order, each
        with its chain hash (`row_hash`) and its details parsed: the evidence a run's lineage
        cites and `esper library lineage` checks."""
        subjects, seqs = list(subjects), [int(s) for s in seqs]
        where = []
        if subjects:
            where.append(f"subject IN ({', '.join('?' for _ in subjects)})")
        if seqs:
            where.append(f"seq IN ({', '.join('?' for _ in seqs)})")
        if not where:
            return []
        rows = self._rows("SELECT seq, at, actor, action, subject, details, row_hash FROM"
                          f" audit_log WHERE {' OR '.join(where)} ORDER BY seq",
                          (*subjects, *seqs))
        return [dict(r, details=json.loads(r["details"])) for r in rows]

    def verify_audit_chain(self) -> AuditCheck:
        """The hash chain, and that it reaches every record's latest change (`verify_tail`)."""
        with self._snapshot():
            return verify_tail(self.db, verify_chain(self.db))

    def verify(self) -> VerifyReport:
        """Check everything that can be checked: the database file, the audit chain, every
        blob's hash, every reference from a row to a blob, every kernel manifest's signature
        against the forge key and every stored validation report's against the bench key. Both
        public keys are read even while nothing is signed: a damaged key is found by verify,
        not by the first kernel the forge builds."""
        problems: list[str] = []
        keys = {role: self._trusted_key(role, problems) for role in KEY_ROLES}
        for (line,) in self.db.execute("PRAGMA quick_check").fetchall():
            if line != "ok":
                problems.append(f"database: {line}")
        audit = self.verify_audit_chain()
        if not audit.ok:
            problems.append(f"audit log: row {audit.first_bad_seq}: {audit.reason}")
        problems += self.store.verify_all()
        blobs = sum(1 for _ in self.store.iter_hashes())
        with self._snapshot():
            problems += self._check_blueprint_refs()
            problems += self._check_manifests(keys["forge"])
            reports = self._rows("SELECT id, kernel_id, signed_blob, body FROM validation_reports"
                                 " ORDER BY id")
            problems += self._check_reports(reports, keys["bench"])
            problems += self._check_tag_refreshes(keys["bench"])
        return VerifyReport(audit=audit, blobs_checked=blobs, reports_checked=len(reports),
                            problems=problems)

    def stats(self) -> dict:
        """Counts for `esper library stats` and dashboards."""
        with self._snapshot():
            def by_status(table: str) -> dict[str, int]:
                return {r["status"]: r["n"] for r in self._rows(
                    f"SELECT status, count(*) AS n FROM {table} GROUP BY status ORDER BY status")}

            def count(table: str) -> int:
                return self._scalar(f"SELECT count(*) FROM {table}")

            counts = {
                "schema_version": applied_version(self.db),
                "blueprints": by_status("blueprints"),
                "kernels": by_status("kernels"),
                "validation_reports": count("validation_reports"),
                "field_reports": count("field_reports"),
                "decisions": count("decisions"),
                "runs": count("runs"),
                "policies": count("policies"),
                "requested_interfaces": count("interfaces"),
                "processed_events": count("processed_events"),
                "audit_rows": count("audit_log"),
            }
        hashes = list(self.store.iter_hashes())
        counts["blobs"] = len(hashes)
        counts["blob_bytes"] = sum(self.store.size(h) for h in hashes)
        return counts

    # Internals ------------------------------------------------------------------------------
    def _check_blueprint_refs(self) -> list[str]:
        problems = []
        for row in self._rows("SELECT id, architecture_ref FROM blueprints ORDER BY id"):
            if row["architecture_ref"] != row["id"]:
                problems.append(f"blueprint {row['id']}: architecture_ref "
                                f"{row['architecture_ref']} is not its id")
            if not self.store.has(row["architecture_ref"]):
                problems.append(f"blueprint {row['id']}: IR blob {row['architecture_ref']} "
                                "is missing")
        return problems

    def _check_manifests(self, forge_key: Ed25519PublicKey | None) -> list[str]:
        problems = []
        for row in self._rows("SELECT id, kernel_binary_ref FROM kernels ORDER BY id"):
            what = f"kernel {row['id']}: manifest"
            try:
                document = self.store.get(row["kernel_binary_ref"])
                if forge_key is not None:
                    body = open_signed(document, forge_key, what=what)
                    problems += [f"{what}: {name} (blob {digest}) is not in the artifact store"
                                 for name, digest in _named_files(body)
                                 if not (is_digest(digest) and self.store.has(digest))]
            except (NotFoundError, IntegrityError) as e:
                problems.append(str(e) if str(e).startswith(what) else f"{what}: {e}")
        for row in self._rows(
                "SELECT k.id FROM kernels k LEFT JOIN validation_reports r"
                " ON r.id = k.validation_report_id"
                " WHERE k.status = 'VALIDATED' AND (r.id IS NULL OR r.passed != 1) ORDER BY k.id"):
            problems.append(f"kernel {row['id']}: VALIDATED without a passing bench-signed report")
        return problems

    def _check_tag_refreshes(self, bench_key: Ed25519PublicKey | None) -> list[str]:
        """Every applied tag refresh is a bench-signed document in the store."""
        problems: list[str] = []
        if bench_key is None:
            return problems
        for row in self._rows("SELECT seq, details FROM audit_log WHERE action = 'kernel.retagged'"
                              " ORDER BY seq"):
            what = f"tag refresh (audit row {row['seq']})"
            try:
                body = open_signed(self.store.get(json.loads(row["details"])["refresh_blob"]),
                                   bench_key, what=what)
                UrabraskTagRefresh.from_json(body, source=what)
            except (NotFoundError, IntegrityError, BadInputError, KeyError) as e:
                problems.append(f"{what}: {e}")
        return problems

    def _check_reports(self, reports: list[dict[str, Any]],
                       bench_key: Ed25519PublicKey | None) -> list[str]:
        problems: list[str] = []
        if bench_key is None:
            return problems
        for row in reports:
            what = f"validation report {row['id']} (kernel {row['kernel_id']})"
            try:
                document = self.store.get(row["signed_blob"])
            except (NotFoundError, IntegrityError) as e:  # missing or damaged
                problems.append(f"{what}: {e}")
                continue
            try:
                body = open_signed(document, bench_key, what=what)
                report = UrabraskValidationReport.from_json(body, source=what)
            except (IntegrityError, BadInputError) as e:
                problems.append(str(e))
                continue
            if body.decode("utf-8") != row["body"]:
                problems.append(f"{what}: stored body differs from the signed document "
                                f"(sha256 {sha256_hex(body)})")
            elif report.kernel_artifact_id != row["kernel_id"]:
                problems.append(f"{what}: the signed report is for kernel "
                                f"{report.kernel_artifact_id}")
        return problems

    def _trusted_key(self, role: KeyRole, problems: list[str]) -> Ed25519PublicKey | None:
        try:
            return self.workspace.public_key(role)
        except (OSError, EsperError) as e:
            problems.append(f"{role} public key cannot be read: {e}")
            return None


def _catalog_file_state(path) -> str | None:
    """How a catalog file that holds nothing is ("missing", "an empty file"), else None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        raise IntegrityError(f"{path}: the catalog is not a regular file; restore urza.db from a "
                             "backup")
    return "an empty file" if info.st_size == 0 else None


def _refuse_replacing_catalog(workspace: Workspace, state: str | None, *,
                              look_again: bool = False) -> None:
    """An IntegrityError if the catalog holds nothing (`state`) in a workspace that had one.

    `look_again`: `state` is what the file looked like a moment ago, outside any lock. The record
    that the catalog exists is written only after its schema committed, so a catalog that another
    process created between that look and the reading of the record is on disk now: look at the
    file once more before calling it lost (two `esper library init` at once)."""
    if state is None:
        return
    evidence = workspace.catalog_evidence()
    if evidence is not None and look_again:
        state = _catalog_file_state(workspace.db_path)
    if evidence is not None and state is not None:
        raise IntegrityError(
            f"{workspace.db_path}: the catalog is {state}, but this workspace had one "
            f"({evidence}); restore urza.db from a backup (a new, empty catalog would orphan "
            "every signed artifact and record)")


def _named_files(manifest_body: bytes) -> list[tuple[str, str]]:
    """The (file name, blob hash) pairs a signed manifest names, from its `files` field. The
    manifest's schema is the loader's to check (pipelines/tezzeret/artifact.py); the catalog
    only follows its references into the store, as it follows the rows'."""
    try:
        files = json.loads(manifest_body).get("files")
    except (ValueError, AttributeError):
        return []
    if not isinstance(files, dict):
        return []
    return sorted((name, digest) for name, digest in files.items() if isinstance(digest, str))
