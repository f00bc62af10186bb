"""Several esper processes on one workspace at the same moment: interleavings forced, not hoped for.

A process is held at a chosen point by an audit hook (`sys.addaudithook`, in the child only) that
waits for a file the test creates: everything else it does, and everything the other process
does, is the real CLI on a real workspace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from catalog_helpers import blueprint, kernel
from process_helpers import ESPER, wait_for

from esper.contracts import (
    LATENCY_MS,
    MEMORY_MB,
    KernelStatus,
    UrabraskTagRefresh,
    UrabraskValidationReport,
)
from esper.errors import EsperError
from esper.oona import stop_embedded
from esper.signing import sign
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.urabrask import tags

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


def _validate(urza, bp, variant: str, latency_ms: float):
    """A kernel registered as the forge does and validated by a bench-signed report."""
    k = kernel(urza, bp, variant=variant)
    report = UrabraskValidationReport(
        kernel_artifact_id=k.id, blueprint_id=k.blueprint_id, passed_validation=True,
        benchmark_results={LATENCY_MS: latency_ms, MEMORY_MB: 10.0}, generated_tags=[])
    signed = sign(report.to_json().encode(), urza.workspace.private_key("bench"), signer="bench")
    return urza.apply_validation_report(signed, actor="bench")


def _signed_refresh_as_the_bench_computes_it(urza) -> bytes | None:
    """What a bench's tag refresh holds (Bench._refresh_tags): the plan for the target's
    VALIDATED kernels as they stand now, signed."""
    validated = urza.list_kernels(status=KernelStatus.VALIDATED, target="cpu")
    changes = tags.retag_plan(validated, device_kind="cpu")
    if not changes:
        return None
    refresh = UrabraskTagRefresh(target="cpu", tags={k: new for k, (_, new) in changes.items()},
                                 population=len(validated) - 1, policy="percentile")
    return sign(refresh.to_json().encode(), urza.workspace.private_key("bench"), signer="bench")


def test_a_tag_refresh_computed_before_another_bench_validated_a_kernel_is_not_applied(
        workspace):
    """Two benches: A plans its refresh against 21 kernels; B validates a 22nd (the fastest) and
    applies its own refresh; then A's arrives. Applied, it would tag the kernels against a
    population that no longer is, and nothing would ever correct it once both benches go idle."""
    with Urza.open(workspace) as a, Urza.open(workspace) as b:
        bp = blueprint(a, "mlp")
        for i in range(tags.MIN_POPULATION + 1):
            _validate(a, bp, f"k{i}", latency_ms=1.0 + i)
        stale = _signed_refresh_as_the_bench_computes_it(a)
        assert stale is not None
        _validate(b, bp, "fastest", latency_ms=0.5)
        b.apply_tag_refresh(_signed_refresh_as_the_bench_computes_it(b), actor="bench-b")
        audit_rows = b.stats()["audit_rows"]
        with pytest.raises(EsperError, match="computed against 20 peers"):
            a.apply_tag_refresh(stale, actor="bench-a")
        validated = a.list_kernels(status=KernelStatus.VALIDATED, target="cpu")
        assert tags.retag_plan(validated, device_kind="cpu") == {}
        assert a.stats()["audit_rows"] == audit_rows
        assert a.verify().ok


def _scratch_of(tmp: Path, daemon: str, pid: int) -> list[Path]:
    return sorted(tmp.glob(f"esper-{daemon}-{pid}-*"))


@pytest.mark.parametrize("daemon", ["bench", "forge"])
def test_a_daemon_clears_the_scratch_folder_of_one_killed_before_it(tmp_path, daemon):
    """A forge or bench killed with kill -9 cannot remove its folder of job files in the temp
    directory; the next daemon of its kind does, and leaves a live one's alone."""
    ws, tmp = tmp_path / "ws", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    assert _esper("--workspace", str(ws), "library", "init").returncode == 0
    daemons = [subprocess.Popen([ESPER, "--workspace", str(ws), daemon, "--poll-interval-s",
                                 "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env) for _ in range(2)]
    try:
        dead, live = daemons
        for d in daemons:
            wait_for(lambda d=d: _scratch_of(tmp, daemon, d.pid), 60, f"{daemon} {d.pid}'s scratch")
        dead.kill()
        dead.wait(timeout=30)
        assert _scratch_of(tmp, daemon, dead.pid)
        once = subprocess.run([ESPER, "--workspace", str(ws), daemon, "--once"],
                              capture_output=True, text=True, env=env, timeout=120, check=False)
        assert once.returncode == 0, once.stderr
        assert _scratch_of(tmp, daemon, dead.pid) == []
        assert _scratch_of(tmp, daemon, live.pid)
    finally:
        for d in daemons:
            d.kill()
            d.wait(timeout=30)
        stop_embedded(Workspace(ws))  # the daemons started the workspace's bus
