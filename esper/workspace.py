"""The workspace directory: where every esper process of one project meets (DESIGN.md section 3).

    workspace.json          marker, written last by `create`: a workspace without it is not one;
                            `catalog_created_at` once urza.db has been created in it
    urza.db                 SQLite catalog (WAL)
    artifacts/sha256/ab/…   content-addressed blobs
    runs/<run_id>/          training runs
    policies/<name>/<ver>/  controller and architect policies
    keys/                   Ed25519 keys: forge.key, bench.key (0600) and their .pub
    oona/                   the embedded Redis server's data, socket and pid file
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from esper._fs import atomic_write_text, held
from esper.errors import BadInputError, EsperError, NotFoundError

if TYPE_CHECKING:  # cryptography loads lazily: `esper --help` must stay fast
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

WORKSPACE_ENV = "ESPER_WORKSPACE"
DEFAULT_WORKSPACE = "esper-workspace"
WORKSPACE_FORMAT = 1
KeyRole = Literal["forge", "bench"]
KEY_ROLES: tuple[KeyRole, ...] = ("forge", "bench")
# How long creating the workspace, or recording its new catalog, waits for another process's
# .init.lock: those take well under a second, so a lock held longer is a process that does not
# let go (stopped, hung, a stale NFS lock), and a command under cron must not wait for ever.
INIT_LOCK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> Workspace:
        """`--workspace`, else `$ESPER_WORKSPACE`, else `./esper-workspace`."""
        chosen = path or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().absolute())

    # Layout ---------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.root / "workspace.json"

    @property
    def db_path(self) -> Path:
        return self.root / "urza.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def policies_dir(self) -> Path:
        return self.root / "policies"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def oona_dir(self) -> Path:
        return self.root / "oona"

    def private_key_path(self, role: KeyRole) -> Path:
        return self.keys_dir / f"{role}.key"

    def public_key_path(self, role: KeyRole) -> Path:
        return self.keys_dir / f"{role}.pub"

    def holds(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path` is, or is under, one of the workspace's own files or directories (the
        layout above, the catalog's -wal, -shm and -journal files, the init lock): where a
        file the user named would replace Esper's state. Symlinks are resolved on both sides."""
        root, target = Path(os.path.realpath(self.root)), Path(os.path.realpath(path))
        db = self.db_path.name
        own = [self.marker.name, db, f"{db}-wal", f"{db}-shm", f"{db}-journal", ".init.lock",
               *(d.name for d in (self.artifacts_dir, self.runs_dir, self.policies_dir,
                                  self.keys_dir, self.oona_dir))]
        return any(target.is_relative_to(root / name) for name in own)

    # Life -----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.marker.is_file()

    def require(self) -> Workspace:
        """Return self if this is a workspace, else a NotFoundError that says how to make one."""
        if not self.exists():
            raise NotFoundError(f"no Esper workspace at {self.root} (run `esper library init` "
                                f"or pass --workspace)")
        return self

    def create(self) -> bool:
        """Make the layout and key pairs; idempotent, never replaces a key. True if it was new."""
        if self.root.exists() and not self.root.is_dir():
            raise BadInputError(f"workspace path {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        with self._init_lock():
            if self.exists():
                return False
            for d in (self.artifacts_dir, self.runs_dir, self.policies_dir, self.oona_dir):
                d.mkdir(exist_ok=True)
            self.keys_dir.mkdir(mode=0o700, exist_ok=True)
            from esper import signing

            for role in KEY_ROLES:
                if not self.private_key_path(role).exists():
                    signing.generate_keypair(self.private_key_path(role), self.public_key_path(role))
            marker = {"format": WORKSPACE_FORMAT, "created_at": datetime.now(UTC).isoformat()}
            atomic_write_text(self.marker, json.dumps(marker, indent=2) + "\n")
            return True

    def catalog_evidence(self) -> str | None:
        """Why this workspace must already have a catalog, or None if it never had one.

        The catalog is made once, by the first `Urza.open` of a new workspace (`esper library
        init`); after that, a missing or empty urza.db is damage: a new empty one would orphan
        every signed blob and record the workspace holds."""
        try:
            created = json.loads(self.marker.read_text(encoding="utf-8")).get("catalog_created_at")
        except (OSError, ValueError, AttributeError):
            created = None
        if created:
            return f"{self.marker.name} records that it was created at {created}"
        # A workspace from before that record: only the catalog writes blobs. (Not runs/: a run
        # takes its lock file there before it opens the catalog.)
        if any(p.is_file() for p in self.artifacts_dir.rglob("*")):
            return "artifacts/ holds blobs"
        return None

    def record_catalog_created(self) -> None:
        """Note in workspace.json that urza.db now exists: from here on, its absence is damage."""
        with self._init_lock():
            marker = json.loads(self.marker.read_text(encoding="utf-8"))
            marker["catalog_created_at"] = datetime.now(UTC).isoformat()
            atomic_write_text(self.marker, json.dumps(marker, indent=2) + "\n")

    def _init_lock(self) -> AbstractContextManager[None]:
        """Hold .init.lock, waiting at most INIT_LOCK_TIMEOUT_S for another process (exit 1, as
        the embedded Redis's server.lock: the workspace is busy, the command was right)."""
        return held(self.root / ".init.lock", INIT_LOCK_TIMEOUT_S, lambda path: EsperError(
            f"timed out after {INIT_LOCK_TIMEOUT_S:g} s waiting for {path}: another esper process "
            "is creating this workspace and has not finished; if none is, end the one holding "
            "the lock (stopped or hung) and run the command again"))

    # Keys -----------------------------------------------------------------------------------
    def private_key(self, role: KeyRole) -> Ed25519PrivateKey:
        from esper import signing

        return signing.load_private_key(self.private_key_path(role))

    def public_key(self, role: KeyRole) -> Ed25519PublicKey:
        from esper import signing

        return signing.load_public_key(self.public_key_path(role))
