"""Blueprints in the catalog: registration, lookup, the status machine, the forge's work queue."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from esper.contracts import BLUEPRINT_TRANSITIONS, Blueprint, BlueprintStatus, LayerKind
from esper.contracts.base import describe_validation_error, utcnow
from esper.errors import BadInputError, IllegalTransitionError, NotFoundError
from esper.urza.leases import LeaseCatalog, LeaseQueue
from esper.urza.rows import (
    KERNEL_SELECT,
    blueprint_from_row,
    kernel_from_row,
    prefix_pattern,
)
from esper.urza.store import sha256_hex
from esper.urza.values import (
    canonical_json,
    lease_window,
    now_iso,
    parse_enum,
    require_text,
    to_iso,
)

# The forge's queue: a claimed blueprint is COMPILING; a released one is UNVALIDATED again.
_FORGE_QUEUE = LeaseQueue(
    table="blueprints", subject="blueprint", held_status="COMPILING",
    waiting="(status = 'UNVALIDATED'"
            " OR (status = 'COMPILING' AND (lease_until IS NULL OR lease_until < :now)))",
    claim_sets="status = 'COMPILING', ", release_sets="status = 'UNVALIDATED', ")


class BlueprintCatalog(LeaseCatalog):
    # Registration -----------------------------------------------------------------------------
    def add_blueprint(self, ir_json: bytes, *, name: str, interface_kind: LayerKind,
                      origin: str = "human", parent_ids: Iterable[str] = (),
                      metadata: dict[str, Any] | None = None,
                      actor: str) -> tuple[Blueprint, bool]:
        """Register a design from its canonical IR bytes (validated by the caller).

        The id is sha256(ir_json) and the IR goes into the artifact store under that hash.
        Returns the catalog's blueprint and whether it is new: the same IR again (by hash)
        changes nothing and returns the existing record.
        """
        if not isinstance(ir_json, bytes) or not ir_json:
            raise BadInputError("a blueprint IR must be non-empty bytes (its canonical JSON)")
        require_text(actor, "actor")
        blueprint_id = sha256_hex(ir_json)
        metadata = {} if metadata is None else metadata
        canonical_json(metadata, what="blueprint metadata")
        try:
            candidate = Blueprint(
                id=blueprint_id, name=name, architecture_ref=blueprint_id,
                interface_kind=parse_enum(LayerKind, interface_kind, "interface kind"),
                origin=origin, parent_ids=list(parent_ids), metadata=metadata, created_at=utcnow(),
            )
        except ValidationError as e:
            raise BadInputError(describe_validation_error(e, "blueprint")) from None
        # Blob first, row second: a crash in between leaves an unreferenced blob (harmless),
        # never a row that points at nothing.
        self.store.put(ir_json)
        with self.transaction():
            existing = self._blueprint_row(blueprint_id)
            if existing is not None:
                return blueprint_from_row(existing), False
            for parent in candidate.parent_ids:
                if self._blueprint_row(parent) is None:
                    raise NotFoundError(f"parent blueprint {parent} is not in the catalog")
            created = to_iso(candidate.created_at)
            self._execute(
                "INSERT INTO blueprints (id, name, status, architecture_ref, interface_kind,"
                " origin, parent_ids, metadata, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (blueprint_id, candidate.name, candidate.status.value, blueprint_id,
                 candidate.interface_kind.value, candidate.origin,
                 json.dumps(candidate.parent_ids), canonical_json(candidate.metadata),
                 created, created),
            )
            self.audit(actor, "blueprint.added", blueprint_id,
                       {"name": candidate.name, "origin": candidate.origin,
                        "interface_kind": candidate.interface_kind.value,
                        "parent_ids": candidate.parent_ids})
            return blueprint_from_row(self._blueprint_row(blueprint_id)), True

    # Lookup ---------------------------------------------------------------------------------
    def get_blueprint(self, id_or_prefix: str) -> Blueprint:
        """A blueprint by id or unique prefix, with its portfolio of compiled artifacts."""
        with self._snapshot():
            row = self._resolve_blueprint(id_or_prefix)
            artifacts = [kernel_from_row(r) for r in self._rows(
                KERNEL_SELECT + " WHERE k.blueprint_id = ? ORDER BY k.created_at, k.id",
                (row["id"],))]
        return blueprint_from_row(row, artifacts)

    def blueprint_ir(self, id_or_prefix: str) -> bytes:
        """The IR bytes, read from the store and checked against the blueprint's hash."""
        row = self._resolve_blueprint(id_or_prefix)
        return self.store.get(row["architecture_ref"])

    def list_blueprints(self, status: BlueprintStatus | str | None = None,
                        origin: str | None = None, name: str | None = None) -> list[Blueprint]:
        """Blueprints in registration order (without their artifact portfolios: see
        `get_blueprint` or `list_kernels(blueprint_id=...)`)."""
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(parse_enum(BlueprintStatus, status, "blueprint status").value)
        if origin is not None:
            where.append("origin = ?")
            params.append(origin)
        if name is not None:
            where.append("name = ?")
            params.append(name)
        sql = "SELECT * FROM blueprints"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [blueprint_from_row(r)
                for r in self._rows(sql + " ORDER BY created_at, rowid", tuple(params))]

    # Status ---------------------------------------------------------------------------------
    def set_blueprint_status(self, blueprint_id: str, new: BlueprintStatus, *, actor: str,
                             reason: str | None = None, worker: str | None = None) -> Blueprint:
        """Move a blueprint along BLUEPRINT_TRANSITIONS; anything else is refused.

        `worker`: the forge worker finishing its claim; the change is refused unless that worker
        still holds the claim (its lease may have expired and been taken over). Leaving
        COMPILING ends any claim. Setting COMPILING by hand queues the blueprint for a
        (re)compile: it has no lease, so the next `claim_next_blueprint` takes it.
        """
        new = parse_enum(BlueprintStatus, new, "blueprint status")
        require_text(actor, "actor")
        with self.transaction():
            row = self._resolve_blueprint(blueprint_id)
            old = BlueprintStatus(row["status"])
            if new not in BLUEPRINT_TRANSITIONS[old]:
                allowed = ", ".join(sorted(s.value for s in BLUEPRINT_TRANSITIONS[old])) or "none"
                raise IllegalTransitionError(
                    f"blueprint {row['id']}: {old.value} -> {new.value} is not allowed "
                    f"(from {old.value}: {allowed})")
            if worker is not None and (old is not BlueprintStatus.COMPILING
                                       or row["claimed_by"] != worker):
                raise IllegalTransitionError(
                    f"blueprint {row['id']} is not claimed by {worker!r} (status {old.value}, "
                    f"claimed by {row['claimed_by']!r})")
            self._execute(
                "UPDATE blueprints SET status = ?, status_reason = ?, updated_at = ?,"
                " claimed_by = NULL, lease_until = NULL WHERE id = ? AND status = ?",
                (new.value, reason, now_iso(), row["id"], old.value))
            self.audit(actor, "blueprint.status", row["id"],
                       {"from": old.value, "to": new.value, "reason": reason,
                        "claimed_by": row["claimed_by"]})
            return blueprint_from_row(self._blueprint_row(row["id"]))

    def set_tamiyo_interest(self, blueprint_id: str, value: float, *,
                            actor: str = "tamiyo") -> Blueprint:
        """How often the controller has wanted this design: a hint for Karn and the forge."""
        _require_interest(value, "tamiyo_interest")
        with self.transaction():
            return self._write_tamiyo_interest(self._resolve_blueprint(blueprint_id),
                                               float(value), actor)

    def add_tamiyo_interest(self, blueprint_id: str, amount: float = 1.0, *,
                            actor: str = "tamiyo") -> Blueprint:
        """Count `amount` more choices of this design. The read and the write are one write
        transaction, so runs that choose it at the same moment each count."""
        _require_interest(amount, "the tamiyo_interest increment")
        with self.transaction():
            row = self._resolve_blueprint(blueprint_id)
            return self._write_tamiyo_interest(row, row["tamiyo_interest"] + float(amount), actor)

    def _write_tamiyo_interest(self, row, value: float, actor: str) -> Blueprint:
        self._execute("UPDATE blueprints SET tamiyo_interest = ?, updated_at = ? WHERE id = ?",
                      (value, now_iso(), row["id"]))
        self.audit(actor, "blueprint.tamiyo_interest", row["id"],
                   {"from": row["tamiyo_interest"], "to": value})
        return blueprint_from_row(self._blueprint_row(row["id"]))

    # The forge's queue ------------------------------------------------------------------------
    def claim_next_blueprint(self, worker: str, lease_seconds: float) -> Blueprint | None:
        """Take the oldest blueprint waiting for the forge, or None if there is none.

        Waiting means UNVALIDATED, or COMPILING with no lease (queued by hand) or an expired
        one (its worker died: the claim returns to the queue). One UPDATE picks and takes the
        row, so two workers can never take the same one.
        """
        require_text(worker, "worker")
        now, until = lease_window(lease_seconds)
        with self.transaction():
            claimed_id = self._take_lease(
                _FORGE_QUEUE, worker, until,
                {"worker": worker, "until": until, "now": now, "now_iso": now_iso()})
            if claimed_id is None:
                return None
            return blueprint_from_row(self._blueprint_row(claimed_id))

    def renew_blueprint_lease(self, blueprint_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend `worker`'s claim; False if the claim is no longer its own."""
        return self._renew_lease(_FORGE_QUEUE, self._resolve_blueprint, blueprint_id, worker,
                                 lease_seconds)

    def release_blueprint(self, blueprint_id: str, worker: str) -> bool:
        """Give a claim back (a daemon stopping mid-job): the blueprint is UNVALIDATED again.
        False if `worker` no longer held it."""
        return self._release_lease(_FORGE_QUEUE, self._resolve_blueprint, blueprint_id, worker)

    # Internals ------------------------------------------------------------------------------
    def _blueprint_row(self, blueprint_id: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM blueprints WHERE id = ?", (blueprint_id,))

    def _resolve_blueprint(self, id_or_prefix: str, *, exact: bool = False) -> dict[str, Any]:
        """The row named by a full id or (unless `exact`: workers name their claims in full)
        by a unique prefix."""
        row = self._blueprint_row(id_or_prefix) if isinstance(id_or_prefix, str) else None
        if row is not None:
            return row
        pattern = None if exact else prefix_pattern(id_or_prefix, "blueprint")
        if pattern is not None:
            rows = self._rows("SELECT * FROM blueprints WHERE id GLOB ? ORDER BY id LIMIT 6",
                              (pattern,))
            if len(rows) == 1:
                return rows[0]
            if len(rows) > 1:
                shown = ", ".join(r["id"][:16] for r in rows[:5])
                raise BadInputError(f"blueprint id prefix {id_or_prefix!r} is ambiguous: it "
                                    f"matches {shown}{', ...' if len(rows) > 5 else ''}")
        raise NotFoundError(f"no blueprint with id {id_or_prefix!r}")


def _require_interest(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise BadInputError(f"{what} must be a number >= 0, not {value!r}")
