"""What `esper train --resume` accepts. A run registered by an earlier Esper resumes under this
one: Urza keeps the config a run was registered with and refuses another, and a newer Esper adds
config fields (with defaults that change nothing), so the config it resolves from the same
config.json has keys the registered one lacks; that is still the same run. A resume may plan
more epochs, not fewer than the run has trained."""

from __future__ import annotations

import json
import sqlite3

from tolaria_helpers import esper, write_config

from esper.urza import Urza


def test_a_run_registered_before_a_new_config_field_resumes(ws, tmp_path):
    config = write_config(tmp_path / "run.yaml", epochs=1)
    assert esper(ws, "train", str(config), "--run-id", "old").returncode == 0
    # What an Esper without tamiyo.max_added_parameters registered: the same config, less that key.
    with Urza.open(ws) as urza:
        registered = json.loads(urza.get_run("old").config_json)
    del registered["tamiyo"]["max_added_parameters"]
    conn = sqlite3.connect(ws.db_path)
    with conn:  # the catalog refuses edits through triggers; an older version wrote it this way
        triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                                "AND tbl_name = 'runs'").fetchall()
        for name, _ in triggers:
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE runs SET config_json = ? WHERE run_id = 'old'",
                     (json.dumps(registered, sort_keys=True, separators=(",", ":")),))
        for _, sql in triggers:
            conn.execute(sql)
    conn.close()

    resumed = esper(ws, "train", "--resume", "old", "--epochs", "2")

    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((ws.root / "runs" / "old" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2
    # Urza keeps the config the run was registered with.
    with Urza.open(ws) as urza:
        assert json.loads(urza.get_run("old").config_json) == registered


def test_a_resume_asking_for_fewer_epochs_than_trained_is_refused(ws, tmp_path):
    """`--resume RUN --epochs 2` on a run that trained 3: one line, exit 2, config.json and
    summary.json as they were (before: it 'completed' at epoch 3 of 2 and recorded 2)."""
    config = write_config(tmp_path / "run.yaml", epochs=3)
    assert esper(ws, "train", str(config), "--run-id", "done").returncode == 0
    run = ws.root / "runs" / "done"
    before = {name: (run / name).read_bytes() for name in ("config.json", "summary.json")}

    refused = esper(ws, "train", "--resume", "done", "--epochs", "2")

    assert refused.returncode == 2, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "--epochs 2" in line and "3 epochs" in line, line
    assert {name: (run / name).read_bytes() for name in before} == before
    assert esper(ws, "train", "--resume", "done", "--epochs", "3").returncode == 0  # nothing to do
