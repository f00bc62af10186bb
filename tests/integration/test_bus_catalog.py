"""Oona and Urza together: at-least-once delivery, exactly-once effect through processed_events."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from esper.contracts import EpochEvent, Topic
from esper.oona import Oona, stop_embedded
from esper.urza import Urza

# A consumer that makes its effect durable in Urza, then dies (SIGKILL) before it can XACK.
DIES_BEFORE_ACK = textwrap.dedent("""
    import os, signal, sys
    from esper.contracts import Topic
    from esper.oona import Oona
    from esper.urza import Urza
    from esper.workspace import Workspace

    ws = Workspace(sys.argv[1])
    with Oona.connect(ws, sender_id="nissa-1") as oona, Urza.open(ws) as urza:
        consumer = oona.consumer("nissa", [Topic.SYSTEM_EVENTS_EPOCH], "nissa-1")
        [delivery] = consumer.read(count=1, block_ms=2000)
        event = delivery.envelope
        assert urza.run_once("nissa", event.event_id,
                             lambda: urza.audit("nissa", "epoch.seen", event.event_id, {}))
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _seen(urza: Urza) -> int:
    return urza.db.execute("SELECT count(*) FROM audit_log WHERE action = 'epoch.seen'").fetchone()[0]


def test_redelivery_after_a_killed_consumer_has_no_second_effect(workspace):
    event = EpochEvent(run_id="run", epoch=1, global_step=10, train_loss=0.5, validation_loss=0.6)
    try:
        with Oona.connect(workspace, sender_id="tolaria") as oona, Urza.open(workspace) as urza:
            oona.consumer("nissa", [Topic.SYSTEM_EVENTS_EPOCH], "setup")  # group exists first
            event_id = oona.publish(Topic.SYSTEM_EVENTS_EPOCH, event)

            child = subprocess.run([sys.executable, "-c", DIES_BEFORE_ACK, str(workspace.root)],
                                   check=False, capture_output=True, text=True, timeout=60)
            assert child.returncode == -9, child.stderr
            assert _seen(urza) == 1
            [group] = oona.group_info(Topic.SYSTEM_EVENTS_EPOCH)
            assert group.pending == 1  # read, never acknowledged

            survivor = oona.consumer("nissa", [Topic.SYSTEM_EVENTS_EPOCH], "nissa-2",
                                     claim_idle_ms=100)
            redelivered = []
            time.sleep(0.2)
            survivor.process(
                lambda env: (redelivered.append(env.event_id),
                             urza.audit("nissa", "epoch.seen", env.event_id, {})),
                ledger=urza, block_ms=100)
            assert redelivered == []  # the ledger knew the event: the effect did not run again
            assert _seen(urza) == 1
            assert oona.group_info(Topic.SYSTEM_EVENTS_EPOCH)[0].pending == 0
            assert urza.run_once("nissa", event_id, lambda: None) is False
            assert urza.verify_audit_chain().ok
    finally:
        stop_embedded(workspace)
