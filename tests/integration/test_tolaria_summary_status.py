"""A run's summary.json says "running" from the moment it starts training until it ends, so a
resumed run that dies (SIGKILL, an exception) before writing its own summary does not go on
showing how an earlier session ended: "completed" or "diverged" for a run that is dead mid-way.
The real CLI in a subprocess, and the SDK with the watcher on the workspace's bus."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from filelock import FileLock
from tolaria_helpers import esper, short_dir, signal_mid_epoch, tiny_config, write_config

from esper.errors import BadInputError
from esper.nissa import Watcher
from esper.oona import stop_embedded
from esper.tolaria.run import LOCK_FILE, run_training
from esper.tolaria.trainer import ProgressEvent, TrainingDivergedError
from esper.workspace import Workspace

# 25 steps an epoch, so that a signal lands inside one.
LONG = {"data.kwargs": {"n_samples": 1600}}


@pytest.fixture(scope="module")
def workspace():
    root = short_dir("summary-status-")
    ws = Workspace(root / "ws")
    ws.create()
    yield ws, root
    stop_embedded(ws)
    shutil.rmtree(root, ignore_errors=True)


def summary(ws: Workspace, run_id: str) -> dict:
    return json.loads((ws.root / "runs" / run_id / "summary.json").read_text())


def test_a_completed_run_resumed_for_more_epochs_and_killed_mid_epoch_is_not_completed(workspace):
    """Before: the killed resume left the first session's summary, "completed" at epoch 3."""
    ws, root = workspace
    config = write_config(root / "three.yaml", epochs=3, **LONG)
    done = esper(ws, "train", str(config), "--run-id", "resumed-killed")
    assert done.returncode == 0, done.stderr
    assert summary(ws, "resumed-killed")["status"] == "completed"

    code, stderr = signal_mid_epoch(ws, None, "resumed-killed", signal.SIGKILL, epoch=4,
                                    extra=("--epochs", "12"))
    assert code == -signal.SIGKILL, stderr[-2000:]
    left = summary(ws, "resumed-killed")
    assert left["status"] == "running"
    assert (left["run_id"], left["epochs"], left["epochs_planned"]) == ("resumed-killed", 3, 12)

    # Resumed again to its end, it ends as any run does: the full summary, "completed".
    resumed = esper(ws, "--json", "train", "--resume", "resumed-killed", "--epochs", "12")
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(resumed.stdout)
    assert final == summary(ws, "resumed-killed")
    assert (final["status"], final["epochs"], final["epochs_planned"]) == ("completed", 12, 12)


def watched(ws: Workspace, run_id: str):
    """The run as a watcher reading the workspace's bus from its start and its catalog sees it."""
    watcher = Watcher(ws, None, since_ms=0, run=run_id, publish_alerts=False,
                      start_embedded=False)
    try:
        watcher.start()
        watcher.refresh(force=True)
        return watcher.state.runs[run_id]
    finally:
        watcher.close()


def test_a_resume_that_plans_more_epochs_keeps_them_for_the_next_resume(workspace):
    """Before: the resume with --epochs 12 left config.json at epochs 3, so once it was killed a
    plain resume planned 3 again and ended "completed" at epoch 4 of 3; and the watcher took 3
    from the config the run registered in Urza over its epoch events' 12, so the dead run at
    epoch 4 or more showed "completed"."""
    ws, root = workspace
    bus = {"telemetry.bus": True}
    config = write_config(root / "grown.yaml", epochs=3, **LONG, **bus)
    done = esper(ws, "train", str(config), "--run-id", "grown")
    assert done.returncode == 0, done.stderr

    # Killed after its fifth epoch: the resumed session's first epoch event (epoch 4) was sent
    # an epoch or more before, so the watcher has it.
    code, stderr = signal_mid_epoch(ws, None, "grown", signal.SIGKILL, epoch=5,
                                    extra=("--epochs", "12"))
    assert code == -signal.SIGKILL, stderr[-2000:]
    saved = json.loads((ws.root / "runs" / "grown" / "config.json").read_text())
    assert saved == tiny_config(epochs=12, **LONG, **bus).model_dump(mode="json")
    run = watched(ws, "grown")
    assert run.epoch >= 4 and run.planned_epochs == 12 and run.status == "running"

    resumed = esper(ws, "--json", "train", "--resume", "grown")
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(resumed.stdout)
    assert (final["status"], final["epochs"], final["epochs_planned"]) == ("completed", 12, 12)
    run = watched(ws, "grown")
    assert (run.epoch, run.planned_epochs, run.status) == (12, 12, "completed")


def test_a_resume_refused_because_the_run_is_training_changes_nothing(workspace):
    """The planned epochs are recorded under the run's lock: a resume of a live run, refused,
    leaves its config.json as it was."""
    ws, _ = workspace
    run_training(tiny_config(epochs=1), workspace=ws, run_id="live")
    path = ws.root / "runs" / "live" / "config.json"
    before = path.read_text()
    # The lock as the training process holds it.
    with FileLock(str(path.parent / LOCK_FILE)), pytest.raises(BadInputError, match="is in use"):
        run_training(tiny_config(epochs=5), workspace=ws, resume="live")
    assert path.read_text() == before


def test_a_diverged_run_whose_resume_fails_at_its_start_is_ended_not_diverged(workspace):
    """The resumed session raises before its first new epoch ends, its process says it is
    stopping, and the watcher reads the summary: before, the first session's "diverged" (its
    epochs matching the bus's last epoch event); now "running", which is no outcome, so the
    watcher says what the bus knows: the run ended."""
    ws, _ = workspace
    config = tiny_config(**{"epochs": 4, "faults.nan_loss_epochs": [2, 3],
                            "rollback.max_rollbacks": 1, "telemetry.bus": True})
    with pytest.raises(TrainingDivergedError):
        run_training(config, workspace=ws, run_id="diverged-then-fails")
    assert summary(ws, "diverged-then-fails")["status"] == "diverged"

    seen = []

    def fail_at_start(event: ProgressEvent) -> None:
        if event.kind == "start":
            seen.append(summary(ws, "diverged-then-fails")["status"])
            raise RuntimeError("the resumed session fails")

    with pytest.raises(RuntimeError, match="the resumed session fails"):
        run_training(None, workspace=ws, resume="diverged-then-fails", progress=fail_at_start)
    assert seen == ["running"]
    assert summary(ws, "diverged-then-fails")["status"] == "running"

    watcher = Watcher(ws, None, since_ms=0, run="diverged-then-fails", publish_alerts=False,
                      start_embedded=False)
    try:
        watcher.start()
        watcher.refresh(force=True)
        run = watcher.state.runs["diverged-then-fails"]
        assert run.finished and run.status == "ended"
    finally:
        watcher.close()


def test_a_run_says_running_while_it_trains_and_completed_at_its_end(workspace):
    ws, _ = workspace
    seen = []

    def note(event: ProgressEvent) -> None:
        if event.kind in ("start", "epoch"):
            seen.append(summary(ws, "plain")["status"])

    result = run_training(tiny_config(epochs=2), workspace=ws, run_id="plain", progress=note)
    assert seen == ["running"] * 3
    assert result.status == "completed"
    assert summary(ws, "plain") == result.summary and result.summary["status"] == "completed"


pytestmark = pytest.mark.timeout(600)
