"""Consumer groups: at-least-once delivery, reclaim of abandoned entries, dead letters.

The rules of DESIGN.md section 6, in the order a message meets them:

- a group reads new entries with `XREADGROUP ... BLOCK`; each delivered entry sits in the
  group's pending list until a consumer acknowledges it, and it is acknowledged only once its
  effect is durable;
- an entry left pending longer than `claim_idle_ms` (its consumer died or failed on it) is taken
  over with `XAUTOCLAIM` by whichever consumer of the group looks next;
- an entry that holds no valid envelope, or that `max_deliveries` deliveries did not get
  acknowledged, is moved to the dead-letter stream `esper:dlq:<topic>` and acknowledged, so it
  stops coming back;
- a consumer applies effects through an `IdempotencyLedger` (Urza's `processed_events`), so a
  message delivered twice has one effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import redis

from esper.contracts import Envelope, Topic
from esper.errors import BadInputError
from esper.oona.streams import (
    TOPIC_BY_STREAM_KEY,
    block_argument,
    dead_letter_fields,
    dead_letter_key,
    parse_envelope,
    text,
)

if TYPE_CHECKING:
    from esper.oona.client import Oona

log = logging.getLogger("esper.oona")

# A dead-letter stream is for an operator to inspect, not an archive: cap it (approximately)
# so that a producer spewing garbage cannot fill the server's memory.
DEAD_LETTER_MAXLEN = 10_000
# XAUTOCLAIM scans the pending list in pages; a few pages per call keeps one reclaim short.
MAX_AUTOCLAIM_PAGES = 8
NO_MORE_PENDING = "0-0"


class IdempotencyLedger(Protocol):
    """Where a consumer group records the events it has applied (Urza's `processed_events`)."""

    def run_once(self, group: str, event_id: str, effect: Callable[[], None]) -> bool:
        """Run `effect` and record `(group, event_id)` durably, together, unless it is recorded.

        True if the effect ran now; False if it had run before (a redelivery).
        """
        ...


@dataclass(frozen=True)
class Delivery:
    """One entry handed to one consumer of a group."""

    topic: Topic
    entry_id: str
    envelope: Envelope
    delivery_count: int  # 1 on first delivery; counts every delivery to the group

    @property
    def stream(self) -> str:
        return self.topic.stream_key


@dataclass(frozen=True)
class AutoclaimReply:
    next_id: str  # where the next scan starts; "0-0" when the pending list was scanned to its end
    claimed: list[tuple[str, dict[bytes, bytes]]]
    deleted_ids: list[str]  # pending entries no longer in the stream (trimmed or XDEL'd)
    unnamed_deleted: int  # Redis 6.2 answers a deleted entry with a bare nil: its id is unknown


def normalise_autoclaim(reply: Sequence[Any]) -> AutoclaimReply:
    """One shape for XAUTOCLAIM's raw replies across Redis versions.

    Redis 6.2: `[next_id, entries]`, a deleted entry being nil (or `[id, nil]`), and it stays
    pending. Redis 7+: `[next_id, entries, deleted_ids]`, deleted entries listed apart and
    already dropped from the pending list.
    """
    if len(reply) not in (2, 3):
        raise ValueError(f"XAUTOCLAIM reply has {len(reply)} elements, expected 2 or 3")
    claimed, deleted, unnamed = [], [], 0
    for item in reply[1]:
        if item is None:
            unnamed += 1
        elif item[1] is None:
            deleted.append(text(item[0]))
        else:
            flat = item[1]
            claimed.append((text(item[0]), dict(zip(flat[::2], flat[1::2], strict=True))))
    if len(reply) == 3:
        deleted.extend(text(entry_id) for entry_id in reply[2])
    return AutoclaimReply(text(reply[0]), claimed, deleted, unnamed)


class Consumer:
    """One named consumer in a consumer group reading one or more topics."""

    def __init__(self, oona: Oona, group: str, topics: list[Topic], consumer_name: str, *,
                 max_deliveries: int = 5, claim_idle_ms: int = 30_000, start_id: str = "0"):
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        if max_deliveries < 1 or claim_idle_ms < 1:
            raise ValueError("max_deliveries and claim_idle_ms must be positive")
        self.group = group
        self.topics = topics
        self.name = consumer_name
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self._oona = oona
        self._next_reclaim = 0.0
        # XAUTOCLAIM replies are parsed by normalise_autoclaim; redis-py's own parser merges the
        # shapes that tell a deleted entry apart.
        oona.redis.set_response_callback("XAUTOCLAIM", _unparsed)
        for topic in topics:
            self._join(topic, start_id)

    def _join(self, topic: Topic, start_id: str) -> None:
        """Create the group on the topic's stream (and the stream), unless it exists."""
        # start_id "0": the group also gets what was published before it existed; "$": only new.
        try:
            self._oona.execute(lambda r: r.xgroup_create(topic.stream_key, self.group,
                                                         id=start_id, mkstream=True))
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # Reading ------------------------------------------------------------------------------------
    def read(self, count: int = 100, block_ms: int | None = 1_000) -> list[Delivery]:
        """Entries never delivered to the group before, waiting up to `block_ms` for some."""
        streams = {topic.stream_key: ">" for topic in self.topics}
        block = block_argument(block_ms)
        reply = self._oona.execute(
            lambda r: r.xreadgroup(self.group, self.name, streams, count=count, block=block))
        deliveries = []
        for key, entries in reply or []:
            topic = TOPIC_BY_STREAM_KEY[text(key)]
            for raw_id, fields in entries:
                delivery = self._deliver(topic, text(raw_id), fields, delivery_count=1)
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    def reclaim(self, count: int = 100) -> list[Delivery]:
        """Take over entries pending in the group for longer than `claim_idle_ms` (XAUTOCLAIM)."""
        deliveries: list[Delivery] = []
        for topic in self.topics:
            if len(deliveries) >= count:
                break
            deliveries += self._reclaim_topic(topic, count - len(deliveries))
        return deliveries

    def ack(self, *deliveries: Delivery) -> None:
        """Acknowledge deliveries (one round trip). Call it only once their effects are durable."""
        by_stream: dict[str, list[str]] = {}
        for delivery in deliveries:
            by_stream.setdefault(delivery.stream, []).append(delivery.entry_id)

        def acknowledge(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=False)
            for stream, entry_ids in by_stream.items():
                pipe.xack(stream, self.group, *entry_ids)
            pipe.execute()

        if by_stream:
            self._oona.execute(acknowledge)

    def process(self, handler: Callable[[Envelope], None], *,
                ledger: IdempotencyLedger | None = None, count: int = 100,
                block_ms: int | None = 1_000) -> int:
        """Handle reclaimed, then new deliveries; returns how many were handled and acknowledged.

        With a ledger the handler runs inside `ledger.run_once`, so a redelivered message has no
        second effect. A handler that raises leaves its delivery pending: it is retried after
        `claim_idle_ms`, and dead-lettered after `max_deliveries`.
        """
        deliveries = self.reclaim(count) if self._reclaim_due() else []
        if len(deliveries) < count:
            # Reclaimed work is ready now: do not wait for new entries on top of it.
            deliveries += self.read(count - len(deliveries),
                                    block_ms=None if deliveries else block_ms)
        done = []
        for delivery in deliveries:
            effect = partial(handler, delivery.envelope)
            try:
                if ledger is None:
                    effect()
                else:
                    ledger.run_once(self.group, delivery.envelope.event_id, effect)
            except Exception as e:  # noqa: BLE001 - one bad message must not stop the consumer
                log.warning("oona: %s failed on %s entry %s (delivery %d of %d), left pending: %s",
                            self.group, delivery.topic.value, delivery.entry_id,
                            delivery.delivery_count, self.max_deliveries, e)
                continue
            done.append(delivery)
        # One XACK for the batch, each effect being durable already. Should this process die
        # before it, the batch is delivered again: the ledger turns that into no-ops.
        self.ack(*done)
        return len(done)

    # Internals ----------------------------------------------------------------------------------
    def _reclaim_due(self) -> bool:
        """Reclaim at most twice per idle period: a busy loop need not scan the pending list."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return False
        self._next_reclaim = now + self.claim_idle_ms / 2000
        return True

    def _reclaim_topic(self, topic: Topic, count: int) -> list[Delivery]:
        key = topic.stream_key
        claimed: list[tuple[str, dict[bytes, bytes]]] = []
        deleted: list[str] = []
        unnamed = 0
        cursor = NO_MORE_PENDING
        for _ in range(MAX_AUTOCLAIM_PAGES):
            wanted = count - len(claimed)
            raw = self._oona.execute(lambda r, start=cursor, wanted=wanted: r.execute_command(
                "XAUTOCLAIM", key, self.group, self.name, self.claim_idle_ms, start,
                "COUNT", wanted))
            reply = normalise_autoclaim(raw)
            claimed += reply.claimed
            deleted += reply.deleted_ids
            unnamed += reply.unnamed_deleted
            cursor = reply.next_id
            if cursor == NO_MORE_PENDING or len(claimed) >= count:
                break
        if unnamed:
            deleted += self._vanished_pending(topic, keep={entry_id for entry_id, _ in claimed})
        if deleted:  # nothing left to deliver: acknowledge them away
            self._oona.execute(lambda r: r.xack(key, self.group, *deleted))
        counts = self._delivery_counts(topic, [entry_id for entry_id, _ in claimed])
        deliveries = []
        for entry_id, fields in claimed:
            if entry_id not in counts:
                continue  # acknowledged by its first consumer in the meantime
            delivery = self._deliver(topic, entry_id, fields, counts[entry_id])
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    def _delivery_counts(self, topic: Topic, entry_ids: list[str]) -> dict[str, int]:
        """How often each entry was delivered to the group, claims included (XPENDING)."""
        if not entry_ids:
            return {}

        def query(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for entry_id in entry_ids:
                pipe.xpending_range(topic.stream_key, self.group, min=entry_id, max=entry_id,
                                    count=1, consumername=self.name)
            return pipe.execute()

        return {text(p["message_id"]): int(p["times_delivered"])
                for found in self._oona.execute(query) for p in found}

    def _vanished_pending(self, topic: Topic, keep: set[str]) -> list[str]:
        """Our pending entries gone from the stream: those Redis 6.2 reports as bare nils."""
        key = topic.stream_key
        pending = self._oona.execute(lambda r: r.xpending_range(
            key, self.group, min="-", max="+", count=1_000, consumername=self.name))
        candidates = [text(p["message_id"]) for p in pending if text(p["message_id"]) not in keep]

        def look_up(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for entry_id in candidates:
                pipe.xrange(key, min=entry_id, max=entry_id, count=1)
            return pipe.execute()

        found = self._oona.execute(look_up) if candidates else []
        return [entry_id for entry_id, hits in zip(candidates, found, strict=True) if not hits]

    def _deliver(self, topic: Topic, entry_id: str, fields: dict[bytes, bytes],
                 delivery_count: int) -> Delivery | None:
        """The delivery of one entry, or None when the entry went to the dead-letter stream."""
        try:
            envelope = parse_envelope(topic, entry_id, fields)
        except BadInputError as e:
            self._dead_letter(topic, entry_id, fields, f"unparseable: {e}", delivery_count)
            return None
        if delivery_count > self.max_deliveries:
            self._dead_letter(topic, entry_id, fields,
                              f"not acknowledged after {self.max_deliveries} deliveries",
                              delivery_count)
            return None
        return Delivery(topic, entry_id, envelope, delivery_count)

    def _dead_letter(self, topic: Topic, entry_id: str, fields: dict[bytes, bytes], reason: str,
                     delivery_count: int) -> None:
        """Move an entry to `esper:dlq:<topic>` and acknowledge it, atomically (MULTI)."""
        record = dead_letter_fields(reason=reason, original_id=entry_id, group=self.group,
                                    consumer=self.name, deliveries=delivery_count, body=fields)

        def move(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.xadd(dead_letter_key(topic), record, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(topic.stream_key, self.group, entry_id)
            pipe.execute()

        self._oona.execute(move)
        log.warning("oona: %s dead-lettered %s entry %s to %s: %s", self.group, topic.value,
                    entry_id, dead_letter_key(topic), reason)


def _unparsed(response: Any, **options: Any) -> Any:
    return response
