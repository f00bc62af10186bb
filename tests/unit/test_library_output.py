"""`write_output`: how a file the user named (`esper library export -o PATH`) is written. Real
files, FIFOs, sockets and symlinks under a temporary directory; nothing outside it is touched."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from esper.errors import BadInputError
from esper.library import write_output

TEXT = '{"name": "exported"}\n'


def leftovers(directory: Path) -> list[str]:
    """Temporary files a write left behind (`.<name>.<random>.tmp`)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_new_file_is_written_whole(tmp_path):
    out = tmp_path / "bp.json"
    assert write_output(out, TEXT) == out
    assert out.read_text() == TEXT
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert leftovers(tmp_path) == []


def test_an_existing_file_is_replaced_and_keeps_its_mode(tmp_path):
    out = tmp_path / "bp.json"
    out.write_text("old contents, longer than the new ones " * 10)
    out.chmod(0o600)
    write_output(out, TEXT)
    assert out.read_text() == TEXT
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_fifo_is_refused_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match=r"pipe: exists and is a FIFO, not a regular file"):
        write_output(fifo, TEXT)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


def test_a_socket_is_refused():
    # AF_UNIX paths are short (108 bytes): a directory directly under /tmp.
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        path = Path(directory) / "s"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            with pytest.raises(BadInputError, match="is a socket, not a regular file"):
                write_output(path, TEXT)
            assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_directory_is_refused(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(BadInputError, match=r"out: is a directory"):
        write_output(target, TEXT)
    assert list(target.iterdir()) == [] and leftovers(tmp_path) == []


def test_a_missing_directory_is_refused_and_not_made(tmp_path):
    out = tmp_path / "no" / "such" / "bp.json"
    with pytest.raises(BadInputError, match=rf"directory {tmp_path / 'no' / 'such'} does not "
                                            "exist"):
        write_output(out, TEXT)
    assert not (tmp_path / "no").exists()


def test_a_file_in_place_of_the_directory_is_refused(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(BadInputError, match="plain is not a directory"):
        write_output(tmp_path / "plain" / "bp.json", TEXT)
    assert (tmp_path / "plain").read_text() == "x"


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert write_output(link, TEXT) == real
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == TEXT
    assert stat.S_IMODE(real.stat().st_mode) == 0o640


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "made.json")
    write_output(link, TEXT)
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == TEXT


def test_a_symlink_to_a_fifo_is_refused_naming_both(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    with pytest.raises(BadInputError, match=rf"link \(-> {fifo}\): exists and is a FIFO"):
        write_output(link, TEXT)
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlink_loop_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(BadInputError, match="cannot write there"):
        write_output(a, TEXT)
    assert a.is_symlink() and b.is_symlink()
