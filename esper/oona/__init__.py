"""Oona, the message bus: Redis Streams through redis-py (DESIGN.md section 6).

    with Oona.connect(workspace, url, sender_id="tolaria") as oona:
        oona.publish(Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(...))
        consumer = oona.consumer("tamiyo", [Topic.TELEMETRY_SEED_HEALTH], "tamiyo-1")
        consumer.process(handle, ledger=urza)

With no URL the bus is the workspace's embedded redis-server (`embedded.py`); training
publishes through a `BufferedPublisher`, which rides out an unreachable bus.
"""

from esper.oona.buffered import BufferedPublisher
from esper.oona.client import GroupInfo, Oona, check_url, redact_url
from esper.oona.consumer import (
    Consumer,
    Delivery,
    IdempotencyLedger,
    normalise_autoclaim,
)
from esper.oona.embedded import (
    EmbeddedServer,
    embedded_running,
    ensure_embedded,
    socket_path_for,
    stop_embedded,
)
from esper.oona.streams import TELEMETRY_RETENTION, DeadLetter, Entry, dead_letter_key

__all__ = [
    "TELEMETRY_RETENTION",
    "BufferedPublisher",
    "Consumer",
    "DeadLetter",
    "Delivery",
    "EmbeddedServer",
    "Entry",
    "GroupInfo",
    "IdempotencyLedger",
    "Oona",
    "check_url",
    "dead_letter_key",
    "embedded_running",
    "ensure_embedded",
    "normalise_autoclaim",
    "redact_url",
    "socket_path_for",
    "stop_embedded",
]
