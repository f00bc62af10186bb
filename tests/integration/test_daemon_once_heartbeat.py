"""A forge or bench run with --once (or --max-jobs) that ends because its work is done says so on
the bus, as a stopped daemon does: `esper watch --once` in the same cron must not page for it."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from typer.testing import CliRunner

from esper.contracts import Envelope, Topic
from esper.oona import Oona, stop_embedded
from esper.workspace import Workspace
from esper_cli.main import app


def test_forge_and_bench_once_end_with_a_stopping_beat():
    root = Path(tempfile.mkdtemp(prefix="do", dir="/tmp"))  # the Redis socket path is short
    ws = Workspace(root / "ws")
    cli = ["--workspace", str(ws.root)]
    try:
        assert CliRunner().invoke(app, [*cli, "library", "init"]).exit_code == 0
        with Oona.connect(ws, sender_id="test"):  # the embedded bus, up as after a training run
            pass
        for command in (["forge", "--once", "--max-jobs", "1", "--interface", "linear:8:4"],
                        ["bench", "--once", "--max-jobs", "1"]):
            result = CliRunner().invoke(app, [*cli, *command])
            assert result.exit_code == 0, result.output
        with Oona.connect(ws, sender_id="test") as bus:
            beats = [e.envelope.payload for e in bus.range(Topic.SYSTEM_HEARTBEATS)]
        last = {b.daemon: b.state for b in beats}
        assert last == {"tezzeret": "stopping", "urabrask": "stopping"}
        assert [b.state for b in beats].count("stopping") == 2  # one each

        rules = ws.root / "rules.yaml"
        rules.write_text("daemon_stale_s: 0.2\n")
        time.sleep(0.3)
        result = CliRunner().invoke(app, [*cli, "watch", "--once", "--json", "--alerts",
                                          str(rules)])
        alerts = [e for e in map(Envelope.from_json, filter(None, result.stdout.splitlines()))
                  if e.topic is Topic.SYSTEM_ALERTS]
        assert (result.exit_code, alerts) == (0, [])
    finally:
        stop_embedded(ws)
        shutil.rmtree(root, ignore_errors=True)
