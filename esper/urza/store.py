"""The artifact store: content-addressed blobs at `artifacts/sha256/ab/<hash>` (DESIGN.md 3).

A blob is named by the sha256 of its bytes, so a name can be checked against the content at any
time and a reference is always a hash, never a path. Writes go through a temporary file in the
blob's own directory (fsync, `os.replace`): a reader, or a process killed mid-write, never sees
part of a blob under its final name. Blobs are written read-only; nothing is ever deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from esper._fs import atomic_write_bytes
from esper.errors import BadInputError, IntegrityError, NotFoundError

# fullmatch, never match/`$`: "…\n" or "../x" must not pass as a digest.
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FANOUT = re.compile(r"[0-9a-f]{2}")
_CHUNK = 1 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_digest(text: object) -> bool:
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None


def _is_temp_name(name: str) -> bool:
    """The names `atomic_write_bytes` gives its temporary files: `.<final>.<random>.tmp`."""
    return name.startswith(".") and name.endswith(".tmp")


class ArtifactStore:
    def __init__(self, artifacts_dir: Path):
        self.root = Path(artifacts_dir) / "sha256"
        self._root = str(self.root)

    def path_for(self, digest: str) -> Path:
        """Where the blob `digest` lives. Anything but 64 lowercase hex digits is refused."""
        if not is_digest(digest):
            raise BadInputError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store `data` and return its hash. Idempotent; a damaged copy is replaced."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadInputError(f"a blob must be bytes, not {type(data).__name__}")
        data = bytes(data)
        digest = sha256_hex(data)
        path = self.path_for(digest)
        if self._holds(path, data):
            return digest
        atomic_write_bytes(path, data, mode=0o444)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes, read once and checked against its name before they are returned."""
        return self._read_checked(digest, writable=False)

    def get_writable(self, digest: str) -> bytearray:
        """As `get`, in a new bytearray that the caller owns: tensors can be made on it without a
        copy (`torch.frombuffer` wants a writable buffer)."""
        return self._read_checked(digest, writable=True)

    def has(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path_for(digest).stat().st_size
        except FileNotFoundError:
            raise self._absent(digest) from None

    def iter_hashes(self) -> Iterator[str]:
        """Every blob in the store, in hash order (temporary and stray files skipped)."""
        for fanout in self._fanout_dirs():
            for entry in sorted(os.scandir(fanout), key=lambda e: e.name):
                if (_DIGEST.fullmatch(entry.name) and entry.name[:2] == fanout.name
                        and entry.is_file(follow_symlinks=False)):
                    yield entry.name

    def verify_all(self) -> list[str]:
        """Re-hash every blob; one line per problem (empty: the store is sound).

        Temporary files of interrupted writes are not problems: they never carry a final name.
        Anything else that is not a correctly placed, correctly named plain file is.
        """
        problems = []
        if not self.root.exists():
            return problems
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not (_FANOUT.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                problems.append(f"unexpected entry in the artifact store: {entry.path}")
        for fanout in self._fanout_dirs():
            for entry in sorted(os.scandir(fanout), key=lambda e: e.name):
                if _is_temp_name(entry.name):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    problems.append(f"{entry.path}: not a plain file")
                elif not (_DIGEST.fullmatch(entry.name) and entry.name[:2] == fanout.name):
                    problems.append(f"{entry.path}: not named by a sha256 digest in its fan-out "
                                    "directory")
                else:
                    actual = _hash_file(Path(entry.path))
                    if actual != entry.name:
                        problems.append(f"blob {entry.name}: content hashes to {actual}")
        return problems

    def sweep_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by writers that were killed; returns how many.

        Only old ones: a young temporary file may belong to a write still in progress.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for fanout in self._fanout_dirs():
            for entry in os.scandir(fanout):
                if (_is_temp_name(entry.name) and entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # Internals ------------------------------------------------------------------------------
    def _read_checked(self, digest: str, *, writable: bool) -> bytes | bytearray:
        # The loader reads several blobs per kernel load: a string path (no pathlib), one open,
        # one read sized by fstat.
        if not is_digest(digest):
            raise BadInputError(f"not a sha256 hex digest: {digest!r}")
        path = f"{self._root}/{digest[:2]}/{digest}"
        try:
            # O_NOFOLLOW: a symlink planted in the store must not lead reads elsewhere.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise self._absent(digest) from None
        except OSError as e:
            raise IntegrityError(f"blob {digest}: cannot be opened as a plain file "
                                 f"({e.strerror})") from None
        with open(fd, "rb", buffering=0) as f:
            if writable:
                data = bytearray(os.fstat(fd).st_size)
                filled = 0
                with memoryview(data) as view:
                    while filled < len(data) and (n := f.readinto(view[filled:])):
                        filled += n
                del data[filled:]  # a file that shrank meanwhile: hashed as read, so refused
            else:
                data = f.readall()
        actual = sha256_hex(data)
        if actual != digest:
            raise IntegrityError(f"blob {digest}: content hashes to {actual}; the stored copy is "
                                 "corrupt or was tampered with")
        return data

    def _absent(self, digest: str) -> NotFoundError:
        return NotFoundError(f"blob {digest} is not in the artifact store ({self.root})")

    def _fanout_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [Path(e.path) for e in sorted(os.scandir(self.root), key=lambda e: e.name)
                if _FANOUT.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]

    @staticmethod
    def _holds(path: Path, data: bytes) -> bool:
        """True if `path` already holds exactly `data` (a put of a known blob writes nothing)."""
        try:
            if path.is_symlink() or path.stat().st_size != len(data):
                return False
            return path.read_bytes() == data
        except FileNotFoundError:
            return False


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
