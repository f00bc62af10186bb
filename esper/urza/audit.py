"""The audit log: an append-only hash chain in the `audit_log` table (DESIGN.md section 5).

Row n stores `prev_hash` (row n-1's `row_hash`, or 64 zeros for the first row) and
`row_hash = sha256(prev_hash + canonical JSON of {seq, at, actor, action, subject, details})`.
Editing any field of a row breaks that row's hash; deleting or reordering rows breaks the link
of the next one. Cutting rows off the end leaves a shorter valid chain, so `verify_tail` checks
the chain against the record tables instead: every write to a record appends a row about it in
the same transaction, timed after the write, so a record changed later than the last row about
it (or with no row at all) means rows are missing from the end, or the record was changed around
the catalog. (It cannot see a cut that removed only rows about records no longer in the tables,
or rows that change no record, such as `seed.rolled_back`.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import sqlite_utils

from esper.urza.values import canonical_json

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class AuditCheck:
    ok: bool
    rows: int
    first_bad_seq: int | None = None
    reason: str | None = None


def row_hash(prev_hash: str, *, seq: int, at: str, actor: str, action: str, subject: str,
             details: Any) -> str:
    fields = {"seq": seq, "at": at, "actor": actor, "action": action, "subject": subject,
              "details": details}
    return hashlib.sha256((prev_hash + canonical_json(fields)).encode("utf-8")).hexdigest()


def append_audit(db: sqlite_utils.Database, *, actor: str, action: str, subject: str,
                 details: dict[str, Any], at: str) -> int:
    """Append one row. The caller holds the write lock (BEGIN IMMEDIATE), so reading the chain's
    head and writing the next link cannot interleave with another writer."""
    if not db.conn.in_transaction:
        raise RuntimeError("audit rows are appended inside a write transaction")
    head = db.execute("SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    details_json = canonical_json(details, what="audit details")
    digest = row_hash(prev, seq=seq, at=at, actor=actor, action=action, subject=subject,
                      details=json.loads(details_json))
    db.execute(
        "INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, row_hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, at, actor, action, subject, details_json, prev, digest),
    )
    return seq


def verify_chain(db: sqlite_utils.Database) -> AuditCheck:
    """Walk the whole chain; report the first row whose link or content does not check out."""
    expected_prev, expected_seq, rows = GENESIS_HASH, 1, 0
    first_bad: tuple[int, str] | None = None
    cursor = db.execute("SELECT seq, at, actor, action, subject, details, prev_hash, row_hash "
                        "FROM audit_log ORDER BY seq")
    for seq, at, actor, action, subject, details, prev_hash, stored_hash in cursor:
        rows += 1
        if first_bad is not None:
            continue  # keep counting rows; the first break is what we report
        if seq != expected_seq:
            first_bad = (seq, f"expected seq {expected_seq} next, found {seq}: rows are missing")
            continue
        if prev_hash != expected_prev:
            first_bad = (seq, "prev_hash does not match the previous row's hash")
            continue
        try:
            parsed = json.loads(details)
        except (TypeError, ValueError):
            first_bad = (seq, "details are not JSON")
            continue
        actual = row_hash(prev_hash, seq=seq, at=at, actor=actor, action=action, subject=subject,
                          details=parsed)
        if actual != stored_hash:
            first_bad = (seq, "row content does not match its row_hash")
            continue
        expected_prev, expected_seq = stored_hash, seq + 1
    if first_bad is None:
        return AuditCheck(ok=True, rows=rows)
    return AuditCheck(ok=False, rows=rows, first_bad_seq=first_bad[0], reason=first_bad[1])


# Records whose every write appends an audit row about them (subject, actions) in the same
# transaction, after the write's own timestamp. A kernel's created_at is the forge's (its
# manifest's), not the catalog's: only its later changes are timed.
_RECORDS = (
    ("blueprint", "blueprints", "id", "updated_at", "blueprint.*"),
    ("kernel", "kernels", "id", "CASE WHEN updated_at = created_at THEN '' ELSE updated_at END",
     "kernel.*"),
    ("run", "runs", "run_id", "created_at", "run.*"),
    ("policy", "policies", "name || '/' || version", "created_at", "policy.*"),
    ("field report", "field_reports", "report_id", "recorded_at", "field_report.*"),
    ("decision", "decisions", "decision_id", "recorded_at", "decision.*"),
)


def verify_tail(db: sqlite_utils.Database, chain: AuditCheck) -> AuditCheck:
    """`chain` (an intact one), failed at the first missing row if some record's latest change is
    not in the log. Timestamps compare as text: the catalog writes them in one format."""
    if not chain.ok:
        return chain
    for what, table, subject, changed, actions in _RECORDS:
        # One row: the latest late record, and (the window runs after HAVING) how many are late.
        late = db.execute(
            f"SELECT r.subject, r.changed, max(a.at) AS last, count(*) OVER () AS n"
            f" FROM (SELECT {subject} AS subject, {changed} AS changed FROM {table}) r"
            " LEFT JOIN audit_log a ON a.subject = r.subject AND a.action GLOB ?"
            " GROUP BY r.subject HAVING last IS NULL OR last < r.changed"
            " ORDER BY r.changed DESC, r.subject LIMIT 1", (actions,)).fetchone()
        if late is None:
            continue
        name, at, last, n = late
        when = (f"changed at {at}, after its last audit row ({last})" if last is not None
                else "has no audit row")
        return replace(chain, ok=False, first_bad_seq=chain.rows + 1, reason=(
            f"missing: {what} {name} {when} ({n} {what} record(s) so); the log was cut short "
            "at its end, or records were changed around the catalog"))
    return chain
