"""What the forge remembers between runs, kept in Urza's audit log (no tables of its own).

- A compile that failed is an audit row `forge.compile_failed` whose subject is the kernel id it
  would have produced. The id hashes the toolchain, so after `max_attempts` failures a job is
  not tried again until the toolchain changes (a pipeline a target cannot build stays failed;
  a new torch gets a fresh chance).
- The daily compile budget counts today's (UTC) `kernel.added` and `forge.compile_failed` rows
  of the whole workspace: every forge of the workspace shares one budget.

Urza has no query API for its audit log yet, so these read the `audit_log` table with SQL
(read-only; the writes go through `Urza.audit`, which keeps the hash chain).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, time
from typing import Any

from esper.urza import Urza

COMPILE_FAILED = "forge.compile_failed"
KERNEL_ADDED = "kernel.added"
# SQLite's limit on bound parameters is 32766 nowadays; stay far below it.
_CHUNK = 500


def record_failure(urza: Urza, actor: str, kernel_id: str, details: dict[str, Any]) -> None:
    urza.audit(actor, COMPILE_FAILED, kernel_id, details)


def failure_counts(urza: Urza, kernel_ids: Iterable[str]) -> dict[str, int]:
    """How often each of these jobs (by the kernel id it would produce) has failed."""
    ids = sorted(set(kernel_ids))
    counts: dict[str, int] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        # audit_log_subject (subject, seq) serves this lookup.
        for subject, n in urza.db.execute(
                f"SELECT subject, count(*) FROM audit_log WHERE subject IN ({marks})"
                " AND action = ? GROUP BY subject", (*chunk, COMPILE_FAILED)).fetchall():
            counts[subject] = n
    return counts


def compiles_today(urza: Urza, now: datetime | None = None) -> int:
    """Compiles (built or failed) recorded in the workspace since 00:00 UTC."""
    now = now or datetime.now(UTC)
    midnight = datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)
    # Timestamps are stored in one fixed ISO format (UTC, microseconds): they sort as text.
    since = midnight.isoformat(timespec="microseconds")
    return urza.db.execute(
        "SELECT count(*) FROM audit_log WHERE at >= ? AND action IN (?, ?)",
        (since, KERNEL_ADDED, COMPILE_FAILED)).fetchone()[0]
