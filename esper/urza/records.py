"""What training runs leave in the catalog: field reports, decisions, runs, policies and the
interfaces runs have asked kernels for. Each record is written once (a repeat with the same id
changes nothing) and audited in the same transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import TypeAdapter, ValidationError

from esper.contracts import FieldReport, KernelInterface, SeedLifecycle, TamiyoDecision
from esper.contracts.assets import DeviceTarget
from esper.errors import BadInputError, NotFoundError
from esper.urza.db import CatalogBase
from esper.urza.rows import parse_stored
from esper.urza.store import is_digest
from esper.urza.values import (
    canonical_json,
    now_iso,
    parse_enum,
    require_path_safe,
    require_text,
)

Dtype = Literal["float32", "bfloat16", "float16"]
_DTYPES = get_args(Dtype)
_DEVICE_TARGET = TypeAdapter(DeviceTarget)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config_json: str
    registered_by: str
    created_at: datetime


@dataclass(frozen=True)
class PolicyRecord:
    name: str
    version: str
    blob_hash: str
    metadata: dict[str, Any]
    recorded_by: str
    created_at: datetime


@dataclass(frozen=True)
class RequestedInterface:
    """An interface some run wanted kernels for, on one device and dtype."""

    interface: KernelInterface
    target: str
    dtype: str
    times_requested: int
    first_requested_by: str
    first_requested_at: datetime
    last_requested_at: datetime


class RecordCatalog(CatalogBase):
    # Field reports ----------------------------------------------------------------------------
    def record_field_report(self, report: FieldReport, *, actor: str = "tamiyo") -> bool:
        """Keep the outcome of one adaptation; False if this report_id is already kept."""
        if not isinstance(report, FieldReport):
            raise BadInputError(f"record_field_report takes a FieldReport, not "
                                f"{type(report).__name__}")
        require_text(actor, "actor")
        with self.transaction():
            cursor = self._execute(
                "INSERT INTO field_reports (report_id, run_id, blueprint_id, kernel_artifact_id,"
                " seed_id, outcome, pre_metric, post_metric, epoch, body, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (report.report_id, report.run_id, report.blueprint_id, report.kernel_artifact_id,
                 report.seed_id, report.outcome.value, report.pre_metric, report.post_metric,
                 report.epoch, report.to_json(), now_iso()))
            if cursor.rowcount != 1:
                return False
            self.audit(actor, "field_report.recorded", report.report_id,
                       {"run_id": report.run_id, "kernel_artifact_id": report.kernel_artifact_id,
                        "seed_id": report.seed_id, "outcome": report.outcome.value})
            return True

    def list_field_reports(self, *, run_id: str | None = None, blueprint_id: str | None = None,
                           kernel_artifact_id: str | None = None,
                           outcome: SeedLifecycle | str | None = None,
                           limit: int | None = None) -> list[FieldReport]:
        """Field reports in the order they were recorded."""
        where, params = [], []
        for column, value in (("run_id", run_id), ("blueprint_id", blueprint_id),
                              ("kernel_artifact_id", kernel_artifact_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if outcome is not None:
            where.append("outcome = ?")
            params.append(parse_enum(SeedLifecycle, outcome, "outcome").value)
        sql = "SELECT report_id, body FROM field_reports"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY recorded_at, rowid"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise BadInputError(f"limit must be a positive integer, not {limit!r}")
            sql += " LIMIT ?"
            params.append(limit)
        return [parse_stored(FieldReport, json.loads(r["body"]), f"field report {r['report_id']}")
                for r in self._rows(sql, tuple(params))]

    # Decisions ------------------------------------------------------------------------------
    def record_decision(self, decision: TamiyoDecision, *, actor: str = "tamiyo") -> bool:
        """Keep a controller decision and its explanation; False if already kept."""
        if not isinstance(decision, TamiyoDecision):
            raise BadInputError(f"record_decision takes a TamiyoDecision, not "
                                f"{type(decision).__name__}")
        require_text(actor, "actor")
        with self.transaction():
            cursor = self._execute(
                "INSERT INTO decisions (decision_id, run_id, epoch, action, seed_id,"
                " kernel_artifact_id, policy, body, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (decision.decision_id, decision.run_id, decision.epoch, decision.action,
                 decision.seed_id, decision.kernel_artifact_id, decision.policy,
                 decision.to_json(), now_iso()))
            if cursor.rowcount != 1:
                return False
            self.audit(actor, "decision.recorded", decision.decision_id,
                       {"run_id": decision.run_id, "epoch": decision.epoch,
                        "action": decision.action, "seed_id": decision.seed_id,
                        "kernel_artifact_id": decision.kernel_artifact_id,
                        "policy": decision.policy, "explanation": decision.explanation})
            return True

    def list_decisions(self, *, run_id: str | None = None) -> list[TamiyoDecision]:
        sql, params = "SELECT decision_id, body FROM decisions", ()
        if run_id is not None:
            sql, params = sql + " WHERE run_id = ?", (run_id,)
        return [parse_stored(TamiyoDecision, json.loads(r["body"]),
                             f"decision {r['decision_id']}")
                for r in self._rows(sql + " ORDER BY epoch, recorded_at, rowid", params)]

    # Runs -----------------------------------------------------------------------------------
    def register_run(self, run_id: str, config_json: str, *, actor: str = "tolaria") -> bool:
        """Record a training run and its resolved config. Registering it again with the same
        config (a resumed run) changes nothing; with another config it is refused."""
        require_path_safe(run_id, "run id")
        require_text(actor, "actor")
        if not isinstance(config_json, str):
            raise BadInputError("a run's config must be JSON text")
        try:
            config = json.loads(config_json)
        except ValueError as e:
            raise BadInputError(f"run {run_id}: config is not JSON ({e})") from None
        config_text = canonical_json(config, what=f"run {run_id} config")
        with self.transaction():
            existing = self._row("SELECT config_json FROM runs WHERE run_id = ?", (run_id,))
            if existing is not None:
                if existing["config_json"] != config_text:
                    raise BadInputError(f"run {run_id} is already registered with a different "
                                        "config; choose another run id")
                return False
            self._execute("INSERT INTO runs (run_id, config_json, registered_by, created_at)"
                          " VALUES (?, ?, ?, ?)", (run_id, config_text, actor, now_iso()))
            self.audit(actor, "run.registered", run_id, {"config": config})
            return True

    def get_run(self, run_id: str) -> RunRecord:
        row = self._row("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if row is None:
            raise NotFoundError(f"no run with id {run_id!r}")
        return _run_record(row)

    def list_runs(self) -> list[RunRecord]:
        return [_run_record(r) for r in self._rows("SELECT * FROM runs ORDER BY created_at, rowid")]

    # Policies -------------------------------------------------------------------------------
    def record_policy(self, name: str, version: str, blob_hash: str,
                      metadata: dict[str, Any] | None = None, *, actor: str = "simic") -> bool:
        """Record a trained policy version (its weights are the blob `blob_hash`). A version is
        immutable: the same one again changes nothing, a different blob under it is refused."""
        require_path_safe(name, "policy name")
        require_path_safe(version, "policy version")
        require_text(actor, "actor")
        if not is_digest(blob_hash):
            raise BadInputError(f"policy {name}/{version}: not a sha256 hex digest: {blob_hash!r}")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise BadInputError(f"policy {name}/{version}: metadata must be a dict")
        metadata_text = canonical_json(metadata, what=f"policy {name}/{version} metadata")
        with self.transaction():
            existing = self._row("SELECT blob_hash, metadata FROM policies"
                                 " WHERE name = ? AND version = ?", (name, version))
            if existing is not None:
                if (existing["blob_hash"], existing["metadata"]) != (blob_hash, metadata_text):
                    raise BadInputError(f"policy {name}/{version} is already recorded with other "
                                        "content; versions are immutable, record a new one")
                return False
            self._execute("INSERT INTO policies (name, version, blob_hash, metadata, recorded_by,"
                          " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                          (name, version, blob_hash, metadata_text, actor, now_iso()))
            self.audit(actor, "policy.recorded", f"{name}/{version}",
                       {"blob_hash": blob_hash, "metadata": metadata})
            return True

    def get_policy(self, name: str, version: str | None = None) -> PolicyRecord:
        """One version of a policy, or its latest recorded one."""
        if version is None:
            row = self._row("SELECT * FROM policies WHERE name = ?"
                            " ORDER BY created_at DESC, rowid DESC LIMIT 1", (name,))
        else:
            row = self._row("SELECT * FROM policies WHERE name = ? AND version = ?",
                            (name, version))
        if row is None:
            which = f"{name}/{version}" if version is not None else name
            raise NotFoundError(f"no policy {which!r}")
        return _policy_record(row)

    def list_policies(self, name: str | None = None) -> list[PolicyRecord]:
        sql, params = "SELECT * FROM policies", ()
        if name is not None:
            sql, params = sql + " WHERE name = ?", (name,)
        return [_policy_record(r) for r in self._rows(sql + " ORDER BY name, created_at", params)]

    # Requested interfaces -------------------------------------------------------------------
    def register_interface(self, interface: KernelInterface, *, target: str, dtype: str,
                           actor: str = "tolaria") -> bool:
        """Note that a run wants kernels for `interface` on `target`/`dtype` (the forge compiles
        blueprints for every requested interface). True the first time it is asked for."""
        if not isinstance(interface, KernelInterface):
            raise BadInputError(f"register_interface takes a KernelInterface, not "
                                f"{type(interface).__name__}")
        _check_target(target)
        if dtype not in _DTYPES:
            raise BadInputError(f"unknown dtype {dtype!r} (expected one of: {', '.join(_DTYPES)})")
        require_text(actor, "actor")
        key = (interface.kind.value, interface.in_features, interface.out_features,
               interface.stride, target, dtype)
        now = now_iso()
        with self.transaction():
            cursor = self._execute(
                "INSERT INTO interfaces (kind, in_features, out_features, stride, target, dtype,"
                " first_requested_by, first_requested_at, last_requested_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (*key, actor, now, now))
            if cursor.rowcount == 1:
                self.audit(actor, "interface.requested", str(interface),
                           {"target": target, "dtype": dtype})
                return True
            self._execute(
                "UPDATE interfaces SET times_requested = times_requested + 1, last_requested_at = ?"
                " WHERE kind = ? AND in_features = ? AND out_features = ? AND stride = ?"
                " AND target = ? AND dtype = ?", (now, *key))
            return False

    def requested_interfaces(self, *, target: str | None = None) -> list[RequestedInterface]:
        """Every interface runs have asked for, first asked first."""
        sql, params = "SELECT * FROM interfaces", ()
        if target is not None:
            sql, params = sql + " WHERE target = ?", (target,)
        return [_requested_interface(r) for r in self._rows(sql + " ORDER BY id", params)]


def _check_target(target: object) -> None:
    try:
        _DEVICE_TARGET.validate_python(target, strict=True)
    except ValidationError:
        raise BadInputError(f"bad device target {target!r}: use lowercase letters, digits and "
                            "'_' (at most 32)") from None


def _run_record(row: dict[str, Any]) -> RunRecord:
    return RunRecord(run_id=row["run_id"], config_json=row["config_json"],
                     registered_by=row["registered_by"],
                     created_at=datetime.fromisoformat(row["created_at"]))


def _policy_record(row: dict[str, Any]) -> PolicyRecord:
    return PolicyRecord(name=row["name"], version=row["version"], blob_hash=row["blob_hash"],
                        metadata=json.loads(row["metadata"]), recorded_by=row["recorded_by"],
                        created_at=datetime.fromisoformat(row["created_at"]))


def _requested_interface(row: dict[str, Any]) -> RequestedInterface:
    interface = parse_stored(KernelInterface, {
        "kind": row["kind"], "in_features": row["in_features"],
        "out_features": row["out_features"], "stride": row["stride"]}, f"interface {row['id']}")
    return RequestedInterface(
        interface=interface, target=row["target"], dtype=row["dtype"],
        times_requested=row["times_requested"], first_requested_by=row["first_requested_by"],
        first_requested_at=datetime.fromisoformat(row["first_requested_at"]),
        last_requested_at=datetime.fromisoformat(row["last_requested_at"]))
