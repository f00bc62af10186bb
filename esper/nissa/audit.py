"""`esper watch --audit RUN`: walk the hash chain under one run's audit rows.

A run's rows are its registration, its Tamiyo decisions and its field reports (the subjects
Urza audits them under). Each row's hash is recomputed from its content and the previous row's
hash, and the whole chain is walked too, since a run's rows stand on every row before them.
The first broken link is reported: a row of the run edited, or a break earlier in the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from esper.errors import NotFoundError
from esper.urza import Urza
from esper.urza.audit import GENESIS_HASH, row_hash


@dataclass(frozen=True)
class RunAudit:
    run_id: str
    rows: int  # audit rows about the run
    chain_rows: int  # rows in the whole chain
    first_bad_seq: int | None = None
    reason: str | None = None
    run_seqs: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None

    def to_jsonable(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "ok": self.ok, "rows": self.rows,
                "chain_rows": self.chain_rows, "first_bad_seq": self.first_bad_seq,
                "reason": self.reason}


def audit_run(urza: Urza, run_id: str) -> RunAudit:
    """Check every audit row of `run_id`, and the chain they stand on."""
    try:
        urza.get_run(run_id)
    except NotFoundError:
        raise NotFoundError(f"no run '{run_id}' in the catalog") from None
    subjects = [run_id]
    subjects += [d.decision_id for d in urza.list_decisions(run_id=run_id)]
    subjects += [r.report_id for r in urza.list_field_reports(run_id=run_id)]
    rows = urza.audit_rows(subjects=subjects)
    seqs = [row["seq"] for row in rows]
    previous = {row["seq"]: row["row_hash"]
                for row in urza.audit_rows(seqs=[s - 1 for s in seqs if s > 1])}
    first_bad: tuple[int, str] | None = None
    for row in rows:
        prev = GENESIS_HASH if row["seq"] == 1 else previous.get(row["seq"] - 1)
        if prev is None:
            first_bad = (row["seq"], f"row {row['seq'] - 1}, the link before it, is missing")
            break
        expected = row_hash(prev, seq=row["seq"], at=row["at"], actor=row["actor"],
                            action=row["action"], subject=row["subject"], details=row["details"])
        if expected != row["row_hash"]:
            first_bad = (row["seq"], (f"the run's row {row['seq']} ({row['action']} "
                                      f"{row['subject']}) does not match its hash: edited"))
            break
    chain = urza.verify_audit_chain()
    if not chain.ok and seqs and chain.first_bad_seq is not None \
            and chain.first_bad_seq <= max(seqs) \
            and (first_bad is None or chain.first_bad_seq < first_bad[0]):
        first_bad = (chain.first_bad_seq, (f"the chain breaks at row {chain.first_bad_seq}, "
                                           f"under the run's rows: {chain.reason}"))
    return RunAudit(run_id=run_id, rows=len(rows), chain_rows=chain.rows,
                    first_bad_seq=first_bad[0] if first_bad else None,
                    reason=first_bad[1] if first_bad else None, run_seqs=seqs)
