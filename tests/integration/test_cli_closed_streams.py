"""The CLI with its stdout closed (`esper ... >&-`) or its reader gone (`esper ... | head -1`):
no traceback, no "Exception ignored" line, and the exit codes of DESIGN.md section 14. The real
`esper` executable in a subprocess, as a shell starts it: stdout buffered (no PYTHONUNBUFFERED)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ESPER = str(Path(sys.executable).parent / "esper")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


@pytest.mark.parametrize("args, code", [
    (["library", "stats"], 0),
    (["--json", "library", "stats"], 0),
    (["library", "verify"], 0),
    (["library", "show", "deadbeef00"], 2),
])
def test_closed_stdout_runs_the_command_and_keeps_its_exit_code(ws, args, code):
    result = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", ESPER, "--workspace",
                             str(ws.root), *args], stderr=subprocess.PIPE, text=True, env=env(),
                            timeout=120, check=False)
    assert result.returncode == code, result.stderr
    if code == 0:
        assert result.stderr == ""
    else:
        assert len(result.stderr.strip().splitlines()) == 1 and "deadbeef00" in result.stderr


@pytest.mark.parametrize("args", [
    ["--json", "library", "stats"],
    ["--json", "library", "list"],
    ["library", "verify"],
    ["library", "list"],
])
def test_a_reader_that_went_away_ends_the_command_quietly(ws, args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away before the first write
    try:
        result = subprocess.run([ESPER, "--workspace", str(ws.root), *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=env(), timeout=120,
                                check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 1 and result.stderr == ""
