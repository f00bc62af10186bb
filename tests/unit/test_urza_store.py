"""The artifact store: content addressing, atomic writes, refusal of bad names and bad bytes."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from esper.errors import BadInputError, IntegrityError, NotFoundError
from esper.urza import ArtifactStore


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def _tamper(path, data: bytes) -> None:
    os.chmod(path, 0o644)  # blobs are written read-only
    path.write_bytes(data)


def test_put_names_the_blob_by_its_sha256_under_a_fanout_directory(store, tmp_path):
    data = b"blueprint IR bytes"
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    path = tmp_path / "artifacts" / "sha256" / digest[:2] / digest
    assert store.path_for(digest) == path
    assert path.read_bytes() == data
    assert os.stat(path).st_mode & 0o777 == 0o444
    assert store.get(digest) == data
    assert store.has(digest) and store.size(digest) == len(data)


def test_put_is_idempotent_and_writes_nothing_the_second_time(store):
    digest = store.put(b"same")
    path = store.path_for(digest)
    inode = os.stat(path).st_ino
    assert store.put(b"same") == digest
    assert os.stat(path).st_ino == inode  # not rewritten
    assert list(store.iter_hashes()) == [digest]


def test_put_replaces_a_damaged_copy(store):
    digest = store.put(b"original content")
    _tamper(store.path_for(digest), b"original CONTENT")
    with pytest.raises(IntegrityError):
        store.get(digest)
    assert store.put(b"original content") == digest
    assert store.get(digest) == b"original content"


@pytest.mark.parametrize("bad", [
    "../../etc/passwd",
    "ab/../../../../etc/passwd",
    "A" * 64,                       # uppercase is not how we write digests
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",                # `$` in a regex would let this through
    "/" + "a" * 63,
    "",
    "g" * 64,
])
def test_path_for_refuses_anything_but_a_lowercase_sha256(store, bad):
    with pytest.raises(BadInputError, match="not a sha256 hex digest"):
        store.path_for(bad)
    with pytest.raises(BadInputError):
        store.get(bad)


def test_get_of_an_absent_blob_names_it(store):
    missing = "0" * 64
    with pytest.raises(NotFoundError, match=missing):
        store.get(missing)
    assert not store.has(missing)


def test_a_tampered_blob_is_refused_naming_its_hash_and_reported_by_verify_all(store):
    good = store.put(b"good")
    bad = store.put(b"kernel manifest")
    _tamper(store.path_for(bad), b"kernel manifesT")
    with pytest.raises(IntegrityError, match=bad):
        store.get(bad)
    assert store.get(good) == b"good"
    problems = store.verify_all()
    assert len(problems) == 1 and bad in problems[0]


def test_temporary_files_of_interrupted_writes_are_not_blobs(store):
    digest = store.put(b"x")
    fanout = store.path_for(digest).parent
    leftover = fanout / f".{digest}.k2j3h4.tmp"
    leftover.write_bytes(b"half a blo")
    assert list(store.iter_hashes()) == [digest]
    assert store.verify_all() == []
    assert store.sweep_temp_files(older_than_s=3600) == 0  # young: may be a write in progress
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert store.sweep_temp_files(older_than_s=3600) == 1
    assert not leftover.exists() and store.get(digest) == b"x"


def test_verify_all_reports_stray_and_misplaced_files_and_symlinks(store, tmp_path):
    digest = store.put(b"placed right")
    root = tmp_path / "artifacts" / "sha256"
    (root / "zz").mkdir()
    (root / digest[:2] / "notes.txt").write_text("hello")
    other = hashlib.sha256(b"elsewhere").hexdigest()
    wrong_dir = "00" if other[:2] != "00" else "01"
    (root / wrong_dir).mkdir(exist_ok=True)
    (root / wrong_dir / other).write_bytes(b"elsewhere")
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    linked = hashlib.sha256(b"secret").hexdigest()
    (root / linked[:2]).mkdir(exist_ok=True)
    (root / linked[:2] / linked).symlink_to(outside)

    problems = "\n".join(store.verify_all())
    assert "zz" in problems and "notes.txt" in problems and other in problems
    assert linked in problems
    assert list(store.iter_hashes()) == [digest]
    with pytest.raises(IntegrityError, match=linked):
        store.get(linked)  # a symlink is never followed out of the store


def test_put_refuses_non_bytes(store):
    with pytest.raises(BadInputError):
        store.put("text is not bytes")  # type: ignore[arg-type]
