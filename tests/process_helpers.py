"""Helpers for tests that run esper processes: the CLI's path, polling, sandbox children."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ESPER = str(Path(sys.executable).parent / "esper")


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sandbox_children(parent_pid: int, worker_module: str) -> list[int]:
    """The sandboxed `python -m worker_module` processes of a daemon (they name their parent on
    the command line)."""
    marker = f"--parent-pid\0{parent_pid}\0".encode()
    module = worker_module.encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if module in cmdline and marker in cmdline + b"\0":
                found.append(int(entry.name))
    return found
