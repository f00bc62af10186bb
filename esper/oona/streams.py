"""How envelopes sit in Redis streams: one field per entry, and the keys Oona uses.

Each stream entry holds the envelope's JSON in the single field `e`; everything a reader needs
(event id, topic, sender, time, trace) is inside the envelope, so there is one parser.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

from esper.contracts import Envelope, Topic
from esper.errors import BadInputError

ENVELOPE_FIELD = b"e"

# Telemetry is high-volume and only useful while fresh: streams of these topics are trimmed by
# age (DESIGN.md section 6). Everything else is kept until an operator trims it.
TELEMETRY_RETENTION: dict[Topic, timedelta] = {Topic.TELEMETRY_SEED_HEALTH: timedelta(hours=72)}

TOPIC_BY_STREAM_KEY: dict[str, Topic] = {topic.stream_key: topic for topic in Topic}

# The longest a blocking read waits, well inside the client's socket timeout (client.py).
MAX_BLOCK_MS = 5_000


class Entry(NamedTuple):
    """One stream entry read without a consumer group: its stream id and its envelope."""

    entry_id: str
    envelope: Envelope


def dead_letter_key(topic: Topic) -> str:
    """The dead-letter stream of a topic: `esper:dlq:<topic>`."""
    return f"esper:dlq:{topic.value}"


@dataclass(frozen=True)
class DeadLetter:
    """An entry a consumer group gave up on, kept in `esper:dlq:<topic>` for an operator."""

    entry_id: str  # in the dead-letter stream
    reason: str
    original_id: str  # in the topic's stream
    group: str
    consumer: str
    deliveries: int  # Redis's delivery count, the claim that dead-lettered it included
    body: dict[str, bytes]  # the original entry's fields, byte for byte ("e": the envelope)

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
        prefix = len(DEAD_LETTER_BODY_PREFIX)
        return cls(entry_id=entry_id, reason=text(fields.get(b"reason", b"")),
                   original_id=text(fields.get(b"original_id", b"")),
                   group=text(fields.get(b"group", b"")),
                   consumer=text(fields.get(b"consumer", b"")),
                   deliveries=int(fields.get(b"deliveries", b"0")),
                   body={text(k[prefix:]): v for k, v in fields.items()
                         if k.startswith(DEAD_LETTER_BODY_PREFIX)})


# The original fields are copied under this prefix so that they cannot clash with ours.
DEAD_LETTER_BODY_PREFIX = b"body."


def dead_letter_fields(*, reason: str, original_id: str, group: str, consumer: str,
                       deliveries: int, body: dict[bytes, bytes]) -> dict[bytes, bytes | str]:
    fields: dict[bytes, bytes | str] = {b"reason": reason, b"original_id": original_id,
                                        b"group": group, b"consumer": consumer,
                                        b"deliveries": str(deliveries)}
    fields.update({DEAD_LETTER_BODY_PREFIX + k: v for k, v in body.items()})
    return fields


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_envelope(topic: Topic, entry_id: str, fields: dict[bytes, bytes] | None) -> Envelope:
    """The envelope stored in one entry of `topic`'s stream; BadInputError if there is none."""
    where = f"{topic.stream_key} entry {entry_id}"
    if not fields or ENVELOPE_FIELD not in fields:
        raise BadInputError(f"{where}: no '{ENVELOPE_FIELD.decode()}' field holding an envelope")
    envelope = Envelope.from_json(fields[ENVELOPE_FIELD], source=where)
    if envelope.topic is not topic:
        raise BadInputError(f"{where}: envelope for topic {envelope.topic.value} "
                            f"in the stream of {topic.value}")
    return envelope


def min_id_for_age(max_age: timedelta, now_ms: int | None = None) -> str:
    """The smallest stream id younger than `max_age`: entry ids start with their ms timestamp."""
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    return f"{max(0, now_ms - int(max_age.total_seconds() * 1000))}-0"


def block_argument(block_ms: int | None) -> int | None:
    """The BLOCK argument of XREAD/XREADGROUP for a wait of `block_ms` (None: do not wait)."""
    if block_ms is None:
        return None
    if block_ms <= 0:
        # Redis reads BLOCK 0 as "forever", which would outlast the socket timeout.
        raise ValueError("block_ms must be positive (None: do not wait)")
    return min(block_ms, MAX_BLOCK_MS)
