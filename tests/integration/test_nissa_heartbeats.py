"""Daemons beat through DaemonBus: while idle, after each result, and once when stopping."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from esper.contracts import DaemonHeartbeat, KernelCharacterized, Topic
from esper.nissa import WatchState
from esper.oona import Oona, stop_embedded
from esper.workspace import Workspace
from pipelines.daemon_bus import DaemonBus


def test_daemon_bus_beats_idle_busy_and_stopping():
    root = Path(tempfile.mkdtemp(prefix="nh", dir="/tmp"))
    ws = Workspace(root / "ws")
    ws.create()
    try:
        with Oona.connect(ws, sender_id="bench-1") as bus:
            daemon = DaemonBus(bus, group="urabrask", wake_topic=Topic.COMPILATION_KERNEL_READY,
                               worker_id="bench-1", log=logging.getLogger("t"),
                               poll_interval_s=0.3)
            daemon.heartbeat_interval_s = 0.1
            daemon.wait(lambda: False)  # idle for one poll interval: a few beats
            daemon.publish(Topic.VALIDATION_KERNEL_CHARACTERIZED, KernelCharacterized(
                blueprint_id="ab" * 32, kernel_artifact_id="abababababab-cpu-fast-0f1e2d",
                status="VALIDATED"))
            daemon.wait(lambda: True)  # a stop request ends the wait
            beats = [e.envelope.payload for e in bus.range(Topic.SYSTEM_HEARTBEATS)]
            # The wake-up group is the bench's; the watcher reads beats without one.
            assert [g.name for g in bus.group_info(Topic.SYSTEM_HEARTBEATS)] == []
        assert all(isinstance(b, DaemonHeartbeat) for b in beats)
        states = [b.state for b in beats]
        assert states[0] == "idle" and 2 <= states.count("idle") <= 5
        assert states[-2:] == ["busy", "stopping"]
        assert beats[-1].published == {"validation.kernel.characterized": 1}
        assert {b.daemon for b in beats} == {"urabrask"} and beats[-1].uptime_s > 0.2
        state = WatchState()
        with Oona.connect(ws, sender_id="w") as bus:
            for entry in bus.range(Topic.SYSTEM_HEARTBEATS):
                state.apply(entry.envelope)
        [view] = state.daemons.values()
        assert (view.daemon, view.worker_id, view.state, view.beats) == \
            ("urabrask", "bench-1", "stopping", len(beats))
    finally:
        stop_embedded(ws)
        shutil.rmtree(root, ignore_errors=True)
