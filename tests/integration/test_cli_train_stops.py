"""How `esper train` ends when it does not run to its last epoch, as a user meets it: the real CLI
in a subprocess on a workspace holding real, VALIDATED kernels.

SIGTERM stops a run as Ctrl-C does (exit 130, a resume hint, the run resumable to the weights of
an uninterrupted run); a damaged newest checkpoint is set aside and the run resumes from the one
before it; a run that diverges past its rollbacks records that it diverged."""

from __future__ import annotations

import io
import json
import shutil
import signal
import time

import pytest
from safetensors.torch import load_file
from tolaria_helpers import (
    esper,
    forged_workspace,
    same_state,
    short_dir,
    signal_mid_epoch,
    tiny_config,
    write_config,
)

from esper.nissa import Watcher
from esper.nissa.dashboard import render_dashboard
from esper.oona import stop_embedded
from esper.tolaria.checkpoint import CheckpointStore
from esper.tolaria.run import run_training

# 25 steps an epoch, so that a signal lands inside one.
LONG = {"data.kwargs": {"n_samples": 1600}}


@pytest.fixture(scope="module")
def forged():
    root = short_dir("cli-train-stops-")
    ws, _ = forged_workspace(root)
    yield ws, root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def whole(forged):
    """The weights of the uninterrupted run the stopped ones must end with."""
    ws, _ = forged
    return load_file(run_training(tiny_config(**LONG), workspace=ws, run_id="whole").run_dir
                     / "model.safetensors")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_mid_epoch_stops_cleanly_and_resume_ends_with_the_uninterrupted_weights(
        forged, whole, signum):
    ws, root = forged
    config = write_config(root / "long.yaml", **LONG)
    run = f"stopped-{signum.name.lower()}"
    code, stderr = signal_mid_epoch(ws, config, run, signum)
    assert code == 130, stderr[-2000:]
    metrics = ws.root / "runs" / run / "metrics.jsonl"
    reached = len(metrics.read_text().splitlines())
    assert reached < 12, "the run finished before the signal; lengthen it"
    assert f"interrupted: run {run} continues from its last checkpoint with `esper train " \
           f"--resume {run}`" in stderr
    assert "Traceback" not in stderr
    assert not (ws.root / "runs" / run / "model.safetensors").exists()

    resumed = esper(ws, "train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert same_state(whole, load_file(ws.root / "runs" / run / "model.safetensors")) == []
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 13))


def test_resume_sets_a_damaged_newest_checkpoint_aside_and_goes_on_from_the_one_before(forged):
    ws, root = forged
    done = esper(ws, "train", str(write_config(root / "tiny.yaml")), "--run-id", "damaged")
    assert done.returncode == 0, done.stderr
    run_dir = ws.root / "runs" / "damaged"
    finished = load_file(run_dir / "model.safetensors")
    store = CheckpointStore(run_dir / "checkpoints")
    *older, newest = store.list()
    assert [c.epoch for c in older] == [10, 11] and newest.epoch == 12
    tensors = newest.path / "tensors.safetensors"
    damage = bytearray(tensors.read_bytes())
    damage[len(damage) // 2] ^= 0xFF
    tensors.write_bytes(damage)

    resumed = esper(ws, "--json", "train", "--resume", "damaged")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed" and summary["epochs"] == 12
    (line,) = [n for n in summary["notices"] if n.startswith("resumed run damaged")]
    assert line.startswith(f"resumed run damaged from {older[-1].path.name} (epoch 11)")
    assert str(newest.path) in line and f"kept as {newest.path.name}.damaged" in line
    assert [x for x in resumed.stderr.splitlines() if "resumed run" in x] == [line]
    # Epoch 12 trained again from epoch 11's checkpoint, to the weights it had.
    assert same_state(finished, load_file(run_dir / "model.safetensors")) == []
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 13))
    # The damaged one is kept as it was; the new checkpoint takes the next number, and the two
    # older ones are still there (keep_last 3 counts checkpoints, not the damaged one).
    aside = newest.path.with_name(newest.path.name + ".damaged")
    assert (aside / "tensors.safetensors").read_bytes() == damage
    after = store.list()
    assert [c.path.name for c in after[:2]] == [c.path.name for c in older]
    assert after[2].seq == newest.seq + 1 and after[2].epoch == 12

    # None verifies: exit 3, one line, nothing renamed.
    for checkpoint in after:
        (checkpoint.path / "state.json").write_text("{")
    names = sorted(p.name for p in store.directory.iterdir())
    broken = esper(ws, "train", "--resume", "damaged")
    assert broken.returncode == 3, broken.stderr
    assert broken.stderr.startswith("error: no checkpoint of ") and "verifies" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in store.directory.iterdir()) == names


def test_a_run_that_diverges_past_its_rollbacks_records_that_it_diverged(forged):
    """NaN losses at epochs 2 and 3 with one rollback allowed: Tamiyo's divergence rule asks for
    a rollback twice, the second is past the budget, and the run ends. Its summary.json says
    so (it had none: the folder of a diverged run read as one killed mid-run)."""
    ws, root = forged
    config = write_config(root / "diverges.yaml", **{"epochs": 4, "faults.nan_loss_epochs": [2, 3],
                                                     "rollback.max_rollbacks": 1})
    done = esper(ws, "train", str(config), "--run-id", "diverges")
    assert done.returncode == 1, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "run diverges diverged at epoch 3 (non-finite" in line
    run_dir = ws.root / "runs" / "diverges"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["stop_reason"] == line[len("error: "):]
    assert summary["epochs"] == 2 and summary["rollbacks"] == 2
    assert sorted(summary["outputs"]) == ["metrics.jsonl", "summary.json"]
    assert not (run_dir / "model.safetensors").exists()


def test_a_rollback_is_one_line_on_stderr(forged):
    """A NaN loss at epoch 2: the run rolls back once and completes. stderr says so once, on
    the rollback line (before: also as a 'note' line of the same text)."""
    ws, root = forged
    config = write_config(root / "rolls-back.yaml", **{"epochs": 3, "faults.nan_loss_epochs": [2]})
    done = esper(ws, "train", str(config), "--run-id", "rolls-back")
    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stderr.splitlines() if "rolled back" in x]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("rollback: epoch 2: non-finite") and "to epoch 1" in lines[0]
    summary = json.loads((ws.root / "runs" / "rolls-back" / "summary.json").read_text())
    assert summary["rollbacks"] == 1
    assert [n for n in summary["notices"] if "rolled back" in n] == [lines[0][len("rollback: "):]]


def test_watch_sees_that_a_diverged_run_ended_and_shows_it_diverged(forged):
    """The same run on the workspace's bus, then `esper watch`: the run's process said it was
    stopping (tolaria's last heartbeat) and its summary.json says diverged, so it is no stalled
    run (before: run_stalled, exit 4, as Nissa knew only a STOP or the last planned epoch as an
    end) and the dashboard shows it as diverged."""
    ws, root = forged
    config = write_config(root / "diverges-watched.yaml",
                          **{"epochs": 4, "faults.nan_loss_epochs": [2, 3],
                             "rollback.max_rollbacks": 1, "telemetry.bus": True})
    rules = root / "stale.yaml"
    rules.write_text("epoch_stale_s: 0.2\n")
    try:
        done = esper(ws, "train", str(config), "--run-id", "diverges-watched")
        assert done.returncode == 1, done.stderr
        time.sleep(0.3)  # past epoch_stale_s since its last epoch event
        watched = esper(ws, "watch", "--once", "--alerts", str(rules), "--run",
                        "diverges-watched")
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "run_stalled" not in watched.stdout + watched.stderr
        watcher = Watcher(ws, None, since_ms=0, run="diverges-watched", publish_alerts=False,
                          start_embedded=False)
        try:
            watcher.start()
            assert watcher.refresh(force=True) == []
            run = watcher.state.runs["diverges-watched"]
            assert run.finished and run.status == "diverged" and run.epoch == 2
            from rich.console import Console

            console = Console(record=True, width=200, file=io.StringIO())
            console.print(render_dashboard(watcher.state, []))
            (row,) = [x for x in console.export_text().splitlines() if "diverges-watched" in x
                      and "/4" in x]
            assert row.rstrip(" │").endswith("diverged"), row
        finally:
            watcher.close()
    finally:
        stop_embedded(ws)


pytestmark = pytest.mark.timeout(600)
