"""The catalog schema as numbered migrations, applied in order and recorded in `schema_migrations`.

A migration, once released, never changes: a new column or table is a new migration. Each one
runs inside the opener's BEGIN IMMEDIATE transaction (SQLite DDL is transactional), so two
processes opening a fresh workspace at once apply it exactly once between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from esper.errors import EsperError
from esper.urza.values import now_iso


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


# Nothing is hard-deleted (HLD 8.2): triggers refuse DELETE on every record table, and UPDATE
# on the append-only ones. Not records: `kernel_tags` is derived from the latest bench-signed
# validation report or tag refresh (kept, signed, in the store) and is replaced with it; `processed_events` is
# de-duplication bookkeeping that a later migration may prune.
def _no_delete(table: str) -> str:
    return (f"CREATE TRIGGER {table}_never_deleted BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} rows are never deleted'); END")


def _no_update(table: str) -> str:
    return (f"CREATE TRIGGER {table}_append_only BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END")


_INITIAL = (
    # Blueprint designs. `id` = `architecture_ref` = sha256 of the canonical IR JSON.
    # claimed_by/lease_until: the forge worker compiling it (status COMPILING) and until when;
    # previous_claimant: whose expired lease the last claim took over (for the audit log).
    """CREATE TABLE blueprints (
        id TEXT PRIMARY KEY CHECK (length(id) = 64),
        name TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN
            ('UNVALIDATED', 'COMPILING', 'COMPILED', 'INVALID', 'ARCHIVED')),
        status_reason TEXT,
        architecture_ref TEXT NOT NULL CHECK (length(architecture_ref) = 64),
        interface_kind TEXT NOT NULL,
        origin TEXT NOT NULL,
        parent_ids TEXT NOT NULL DEFAULT '[]',
        tamiyo_interest REAL NOT NULL DEFAULT 0 CHECK (tamiyo_interest >= 0),
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        claimed_by TEXT,
        lease_until REAL,
        previous_claimant TEXT
    )""",
    "CREATE INDEX blueprints_queue ON blueprints (status, created_at)",
    "CREATE INDEX blueprints_name ON blueprints (name)",
    # Validation reports: the signed document is a blob; `body` is its verified body, kept for
    # reading without re-verifying (`esper library verify` re-checks one against the other).
    """CREATE TABLE validation_reports (
        id INTEGER PRIMARY KEY,
        kernel_id TEXT NOT NULL REFERENCES kernels (id),
        signed_blob TEXT NOT NULL CHECK (length(signed_blob) = 64),
        body TEXT NOT NULL,
        passed INTEGER NOT NULL CHECK (passed IN (0, 1)),
        applied_at TEXT NOT NULL,
        applied_by TEXT NOT NULL
    )""",
    "CREATE INDEX validation_reports_kernel ON validation_reports (kernel_id)",
    # Compiled kernel artifacts. Latency and memory come from the applied validation report,
    # in columns so that KernelQuery filters and ranks in SQL. Claims (by bench workers) do not
    # change the status: a claimed kernel stays PENDING_BENCHMARKING.
    """CREATE TABLE kernels (
        id TEXT PRIMARY KEY,
        blueprint_id TEXT NOT NULL REFERENCES blueprints (id),
        status TEXT NOT NULL CHECK (status IN
            ('PENDING_BENCHMARKING', 'VALIDATED', 'REJECTED', 'ARCHIVED')),
        status_reason TEXT,
        pipeline TEXT NOT NULL,
        interface_kind TEXT NOT NULL,
        in_features INTEGER NOT NULL,
        out_features INTEGER NOT NULL,
        stride INTEGER NOT NULL,
        target TEXT NOT NULL,
        dtype TEXT NOT NULL,
        toolchain_hash TEXT NOT NULL,
        kernel_binary_ref TEXT NOT NULL CHECK (length(kernel_binary_ref) = 64),
        compilation TEXT,
        latency_ms REAL,
        memory_mb REAL,
        validation_report_id INTEGER REFERENCES validation_reports (id),
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        claimed_by TEXT,
        lease_until REAL,
        previous_claimant TEXT
    )""",
    "CREATE INDEX kernels_queue ON kernels (status, created_at)",
    "CREATE INDEX kernels_blueprint ON kernels (blueprint_id)",
    ("CREATE INDEX kernels_fit ON kernels "
     "(status, interface_kind, in_features, out_features, stride, target, dtype)"),
    """CREATE TABLE kernel_tags (
        kernel_id TEXT NOT NULL REFERENCES kernels (id),
        tag TEXT NOT NULL,
        PRIMARY KEY (kernel_id, tag)
    ) WITHOUT ROWID""",
    "CREATE INDEX kernel_tags_by_tag ON kernel_tags (tag, kernel_id)",
    # Observations from training runs. No foreign keys: a report names the kernel it ran, and
    # is worth keeping even if it names one this catalog never held.
    """CREATE TABLE field_reports (
        report_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        blueprint_id TEXT NOT NULL,
        kernel_artifact_id TEXT NOT NULL,
        seed_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        pre_metric REAL NOT NULL,
        post_metric REAL NOT NULL,
        epoch INTEGER NOT NULL,
        body TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    )""",
    "CREATE INDEX field_reports_run ON field_reports (run_id)",
    "CREATE INDEX field_reports_blueprint ON field_reports (blueprint_id)",
    "CREATE INDEX field_reports_kernel ON field_reports (kernel_artifact_id)",
    """CREATE TABLE decisions (
        decision_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        action TEXT NOT NULL,
        seed_id TEXT,
        kernel_artifact_id TEXT,
        policy TEXT NOT NULL,
        body TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    )""",
    "CREATE INDEX decisions_run ON decisions (run_id, epoch)",
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        config_json TEXT NOT NULL,
        registered_by TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE policies (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        blob_hash TEXT NOT NULL CHECK (length(blob_hash) = 64),
        metadata TEXT NOT NULL DEFAULT '{}',
        recorded_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    # Interfaces that runs asked kernels for; the forge compiles blueprints for them.
    """CREATE TABLE interfaces (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        in_features INTEGER NOT NULL,
        out_features INTEGER NOT NULL,
        stride INTEGER NOT NULL,
        target TEXT NOT NULL,
        dtype TEXT NOT NULL,
        first_requested_by TEXT NOT NULL,
        first_requested_at TEXT NOT NULL,
        last_requested_at TEXT NOT NULL,
        times_requested INTEGER NOT NULL DEFAULT 1,
        UNIQUE (kind, in_features, out_features, stride, target, dtype)
    )""",
    # Idempotent consumption of bus events: one row per (consumer group, event) ever applied.
    """CREATE TABLE processed_events (
        consumer_group TEXT NOT NULL,
        event_id TEXT NOT NULL,
        processed_at TEXT NOT NULL,
        PRIMARY KEY (consumer_group, event_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        row_hash TEXT NOT NULL
    )""",
    "CREATE INDEX audit_log_subject ON audit_log (subject, seq)",
    *(_no_delete(t) for t in ("blueprints", "kernels", "validation_reports", "field_reports",
                              "decisions", "runs", "policies", "interfaces", "audit_log")),
    *(_no_update(t) for t in ("validation_reports", "field_reports", "decisions", "audit_log")),
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial catalog", _INITIAL),
)

LATEST_VERSION = MIGRATIONS[-1].version


def applied_version(db) -> int:
    if not db["schema_migrations"].exists():
        return 0
    return db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(db) -> list[int]:
    """Apply every migration newer than the catalog; returns the versions applied.

    The caller holds the write lock (BEGIN IMMEDIATE).
    """
    if not db.conn.in_transaction:
        raise RuntimeError("migrations run inside a write transaction")
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
               "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
    current = applied_version(db)
    if current > LATEST_VERSION:
        raise EsperError(f"the catalog has schema version {current}, newer than this esper knows "
                         f"({LATEST_VERSION}); upgrade esper")
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        for statement in migration.statements:
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                   (migration.version, migration.name, now_iso()))
        applied.append(migration.version)
    return applied
