"""The workspace's .init.lock, held by another process that does not let go (stopped with
SIGSTOP, hung, a stale NFS lock): creating the workspace, or recording in it that its catalog now
exists, waits a bounded time, then exits 1 with one line naming the lock file, instead of
hanging for ever (under cron, unseen). The holder is a real second process holding a real file
lock; the wait is shortened from 60 s through the module's constant."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from process_helpers import wait_for
from typer.testing import CliRunner

from esper import workspace as workspace_module
from esper.errors import EsperError
from esper.urza import Urza
from esper.workspace import Workspace
from esper_cli.main import app

# Takes the lock, says so, and holds it until its stdin closes.
_HOLDER = """
import sys
from pathlib import Path
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
Path(sys.argv[2]).touch()
sys.stdin.read()
"""


@contextmanager
def held_init_lock(ws: Workspace) -> Iterator[subprocess.Popen]:
    """Another process holds `ws`'s .init.lock until the block ends (or its stdin closes)."""
    ws.root.mkdir(parents=True, exist_ok=True)
    holding = ws.root.parent / "holding"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ws.root / ".init.lock"),
                               str(holding)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: holding.exists() or holder.poll() is not None, 60, "the holder")
        assert holder.poll() is None, "the holder did not take the lock"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_library_init_on_a_workspace_whose_init_lock_is_held_exits_1_naming_the_lock(
        tmp_path, monkeypatch):
    monkeypatch.setattr(workspace_module, "INIT_LOCK_TIMEOUT_S", 0.5)
    ws = Workspace(tmp_path / "ws")
    with held_init_lock(ws):
        started = time.monotonic()
        result = CliRunner().invoke(app, ["--workspace", str(ws.root), "library", "init"])
        assert time.monotonic() - started < 30
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(ws.root / ".init.lock") in lines[0] and "timed out after 0.5 s" in lines[0]
    assert "internal error" not in lines[0]
    assert not ws.exists()  # nothing half-made: no workspace.json


def test_recording_a_new_catalog_waits_a_bounded_time_for_a_held_init_lock(tmp_path, monkeypatch):
    """Urza.open of a new workspace notes in workspace.json, under the same lock, that its
    catalog now exists."""
    monkeypatch.setattr(workspace_module, "INIT_LOCK_TIMEOUT_S", 0.5)
    ws = Workspace(tmp_path / "ws")
    ws.create()
    with held_init_lock(ws), pytest.raises(EsperError) as caught:
        Urza.open(ws)
    assert caught.value.exit_code == 1
    assert str(ws.root / ".init.lock") in str(caught.value)
    with Urza.open(ws):  # the lock free again: the catalog is there and opens
        pass


def test_library_init_waits_for_a_holder_that_lets_go_within_the_wait(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with held_init_lock(ws) as holder:
        threading.Timer(1.0, holder.stdin.close).start()
        result = CliRunner().invoke(app, ["--workspace", str(ws.root), "library", "init"])
    assert result.exit_code == 0, result.output
    assert ws.exists()
