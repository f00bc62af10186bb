"""The audit log: an append-only hash chain in the `audit_log` table (DESIGN.md section 5).

Row n stores `prev_hash` (row n-1's `row_hash`, or 64 zeros for the first row) and
`row_hash = sha256(prev_hash + canonical JSON of {seq, at, actor, action, subject, details})`.
Editing any field of a row breaks that row's hash; deleting or reordering rows breaks the link
of the next one. (Cutting rows off the end leaves a shorter valid chain: the log proves what it
holds was not altered, not that nothing was appended after it.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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
