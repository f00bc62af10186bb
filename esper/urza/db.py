"""The catalog's connection and transactions: what every part of Urza shares.

Many esper processes open one `urza.db` at once. What keeps them safe:

- WAL, so readers never block the writer and the writer never blocks readers;
- `busy_timeout`, so a writer waits for the lock instead of failing at once;
- the connection in autocommit mode (`isolation_level=None`): Python opens no transaction behind
  our back, every write runs inside `transaction()`, which starts with `BEGIN IMMEDIATE` (the write
  lock is taken up front, so a read-then-write never meets a stale snapshot) and nests as
  SAVEPOINTs, so a helper that writes joins its caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from esper.errors import BadInputError, EsperError, IntegrityError
from esper.urza.audit import append_audit
from esper.urza.store import ArtifactStore
from esper.urza.values import now_iso, require_text
from esper.workspace import Workspace

BUSY_TIMEOUT_S = 30.0

_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_UNWRITABLE = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN}
_DISK = {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL}
_LOCKED = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _primary_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # extended codes keep the primary in the low byte


def file_error(path: Path, error: sqlite3.Error) -> EsperError | None:
    """The one-line error for a failure of the catalog file itself, or None for any other
    (a constraint, a bug): damaged (exit 3), not writable by this user, or the disk failing."""
    code = _primary_code(error)
    if code in _DAMAGED:
        return IntegrityError(f"{path}: the catalog database is damaged ({error}); restore it "
                              "from a backup")
    if code in _UNWRITABLE:
        return EsperError(f"{path}: cannot open or write the catalog ({error}); check that "
                          "this user may write it, its -wal and -shm files and their directory")
    if code in _DISK:
        return EsperError(f"{path}: {error}")
    return None


def connect(path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise EsperError(f"{path}: cannot switch the catalog to WAL mode (got {mode!r})")
        # FULL: a committed catalog row survives power loss, like the fsynced blob it points to.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return sqlite_utils.Database(conn)


class CatalogBase:
    """The connection, the artifact store, transactions and the audit log."""

    def __init__(self, workspace: Workspace, db: sqlite_utils.Database, store: ArtifactStore):
        self.workspace = workspace
        self.db = db
        self.store = store
        self._depth = 0  # 0: no transaction; 1: BEGIN IMMEDIATE; >1: inside SAVEPOINTs

    # Transactions ---------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of writes. Nested calls become savepoints of the outer transaction:
        an exception rolls back exactly the innermost block it escapes."""
        conn = self.db.conn
        if self._depth > 0:
            name = f"urza_{self._depth}"
            conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                if conn.in_transaction:
                    conn.execute(f"ROLLBACK TO {name}")
                    conn.execute(f"RELEASE {name}")
                raise
            else:
                conn.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            if _primary_code(e) in _LOCKED:
                raise EsperError(f"{self.workspace.db_path}: cannot start a write transaction "
                                 f"({e}); another process holds the catalog lock") from None
            error = self.file_error(e)
            if error is None:
                raise
            raise error from e
        self._depth = 1
        try:
            yield
            conn.execute("COMMIT")
        except BaseException as e:
            # SQLite may already have rolled back on its own (disk full, I/O error).
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error) and (error := self.file_error(e)) is not None:
                raise error from e
            raise
        finally:
            self._depth = 0

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Several reads that must see one consistent state (no writes inside)."""
        if self._depth > 0:
            yield
            return
        conn = self.db.conn
        conn.execute("BEGIN DEFERRED")
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            if conn.in_transaction:
                conn.execute("COMMIT")

    def file_error(self, error: sqlite3.Error) -> EsperError | None:
        return file_error(self.workspace.db_path, error)

    def _require_write_transaction(self) -> None:
        if self._depth == 0:
            raise RuntimeError("catalog write outside transaction()")

    # SQL ------------------------------------------------------------------------------------
    def _rows(self, sql: str, params: dict | tuple = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def _row(self, sql: str, params: dict | tuple = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _execute(self, sql: str, params: dict | tuple = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, params)

    def _scalar(self, sql: str, params: dict | tuple = ()) -> Any:
        # fetchall: a write with RETURNING must run to completion before anything else.
        rows = self.db.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    # Audit ----------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> int:
        """Append one row to the hash-chained audit log (joining the caller's transaction, if
        any); returns its sequence number."""
        require_text(actor, "actor")
        require_text(action, "audit action")
        if not isinstance(details, dict):
            raise BadInputError(f"audit details must be a dict, not {type(details).__name__}")
        with self.transaction():
            return append_audit(self.db, actor=actor, action=action, subject=str(subject),
                                details=details, at=now_iso())
