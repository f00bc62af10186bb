"""Several esper processes on one workspace at the same moment: interleavings forced, not hoped for.

A process is held at a chosen point by an audit hook (`sys.addaudithook`, in the child only) that
waits for a file the test creates: everything else it does, and everything the other process
does, is the real CLI on a real workspace.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from process_helpers import ESPER, wait_for

# Runs `esper ARGS...` in this interpreter, paused at the first open() of PAUSE_AT (an absolute
# path) until GO exists; PAUSED is created when it stops there.
_PAUSED_ESPER = """
import os, sys, time
pause_at, paused, go = sys.argv[1:4]
state = {"held": False}
def hook(event, args):
    if event == "open" and not state["held"] and str(args[0]) == pause_at:
        state["held"] = True
        open(paused, "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
sys.addaudithook(hook)
sys.argv = ["esper", *sys.argv[4:]]
from esper_cli.main import main
sys.exit(main())
"""


def _start_paused(tmp_path: Path, pause_at: Path, *args: str) -> tuple[subprocess.Popen, Path,
                                                                        Path]:
    paused, go = tmp_path / "paused", tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", _PAUSED_ESPER, str(pause_at), str(paused),
                              str(go), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for(lambda: paused.exists() or child.poll() is not None, 60, "the child to pause")
    assert child.poll() is None, child.communicate()
    return child, paused, go


def _esper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ESPER, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_two_inits_at_once_both_succeed_when_the_other_creates_the_catalog(tmp_path):
    """B looks at urza.db (missing) and then reads workspace.json; A creates the catalog and
    records it in between. B must see the catalog A made, not call it a lost one (exit 3)."""
    ws = tmp_path / "ws"
    b, _, go = _start_paused(tmp_path, ws / "workspace.json", "--workspace", str(ws),
                             "library", "init")
    a = _esper("--workspace", str(ws), "library", "init")
    assert a.returncode == 0, a.stderr
    go.touch()
    out, err = b.communicate(timeout=120)
    assert b.returncode == 0, err
    assert "0 standard blueprints added" in out
    verify = _esper("--workspace", str(ws), "library", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
