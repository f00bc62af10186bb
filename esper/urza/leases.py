"""Work leases: how forge and bench workers claim, renew and give back rows of a catalog queue.

A claim is one UPDATE that picks and takes the oldest waiting row, so two workers can never take
the same one. A lease that runs out returns its row to the queue; the claim that takes it over
records whose lease it was (`previous_claimant = claimed_by` reads the old value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esper.urza.db import CatalogBase
from esper.urza.values import lease_iso, lease_window, now_iso, require_text


@dataclass(frozen=True)
class LeaseQueue:
    """One table's work queue. Every field is SQL or an audit name written in this package,
    never input."""

    table: str  # "blueprints"
    subject: str  # audit actions are "<subject>.claimed", ".lease_expired" and ".released"
    held_status: str  # the status of a row while a worker holds it
    waiting: str  # the rows a claim may take, expired leases included; " AND ..." must extend it
    claim_sets: str = ""  # what else a claim assigns, e.g. "status = 'COMPILING', "
    release_sets: str = ""  # what else a release assigns


class LeaseCatalog(CatalogBase):
    def _take_lease(self, queue: LeaseQueue, worker: str, until: float, params: dict[str, Any],
                    *, also_where: str = "") -> str | None:
        """Inside the caller's transaction: claim the oldest waiting row for `worker` and
        return its id, or None if nothing waits. `params` holds :worker, :until, :now and
        :now_iso; `also_where` (" AND ...") narrows the queue."""
        self._require_write_transaction()
        claimed = self._row(
            f"UPDATE {queue.table} SET {queue.claim_sets}claimed_by = :worker,"
            " lease_until = :until, previous_claimant = claimed_by, updated_at = :now_iso"
            f" WHERE id = (SELECT id FROM {queue.table}"
            f"              WHERE {queue.waiting}{also_where}"
            "              ORDER BY created_at, rowid LIMIT 1)"
            " RETURNING id, previous_claimant", params)
        if claimed is None:
            return None
        if claimed["previous_claimant"] is not None:
            self.audit(worker, f"{queue.subject}.lease_expired", claimed["id"],
                       {"worker": claimed["previous_claimant"]})
        self.audit(worker, f"{queue.subject}.claimed", claimed["id"],
                   {"lease_until": lease_iso(until)})
        return claimed["id"]

    def _renew_lease(self, queue: LeaseQueue, resolve: Callable[..., dict[str, Any]],
                     item_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend `worker`'s claim on the row `resolve` names (in full); False if the claim is
        no longer its own."""
        require_text(worker, "worker")
        _, until = lease_window(lease_seconds)
        with self.transaction():
            row = resolve(item_id, exact=True)
            cursor = self._execute(
                f"UPDATE {queue.table} SET lease_until = ?"
                f" WHERE id = ? AND status = '{queue.held_status}' AND claimed_by = ?",
                (until, row["id"], worker))
            return cursor.rowcount == 1

    def _release_lease(self, queue: LeaseQueue, resolve: Callable[..., dict[str, Any]],
                       item_id: str, worker: str) -> bool:
        """Give back `worker`'s claim on the row `resolve` names (in full); False if `worker`
        no longer held it."""
        require_text(worker, "worker")
        with self.transaction():
            row = resolve(item_id, exact=True)
            cursor = self._execute(
                f"UPDATE {queue.table} SET {queue.release_sets}claimed_by = NULL,"
                " lease_until = NULL, updated_at = ?"
                f" WHERE id = ? AND status = '{queue.held_status}' AND claimed_by = ?",
                (now_iso(), row["id"], worker))
            if cursor.rowcount != 1:
                return False
            self.audit(worker, f"{queue.subject}.released", row["id"], {})
            return True
