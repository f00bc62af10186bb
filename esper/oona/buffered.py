"""Best-effort publishing for training: "if Redis is unreachable, training goes on".

A training step must never wait on, or fail because of, the bus. `BufferedPublisher` keeps the
messages it could not publish in a bounded buffer, oldest first; when the buffer is full it
drops the oldest (telemetry that old is stale anyway), counts the drops and logs one line per
`drop_log_every`. It tries the bus again after a back-off that doubles up to `retry_max_s`, so
an outage costs a failed connection attempt now and then, not one per step; when the bus is
back, the buffer goes out first, in order, then new messages.

Only what can be lost belongs here: telemetry, epoch heartbeats, lifecycle echoes. Field
reports and lineage are written to Urza as well (DESIGN.md section 6). The buffer holds
envelopes: a 64-seed HealthSignal's takes ~4.5 KB, so the default bound is ~45 MB.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Self

from esper.contracts import Envelope, Topic, VersionedContract
from esper.errors import BusUnavailableError
from esper.oona.client import Oona

log = logging.getLogger("esper.oona")

# Pipeline batch for flushing the buffer: one round trip per batch.
FLUSH_BATCH = 500


class BufferedPublisher:
    """Publishes through an `Oona` from `connect`, buffering while the bus is unreachable."""

    def __init__(self, connect: Callable[[], Oona], *, sender_id: str,
                 max_buffered: int = 10_000, drop_log_every: int = 1_000,
                 retry_min_s: float = 1.0, retry_max_s: float = 30.0):
        if max_buffered < 1:
            raise ValueError("max_buffered must be positive")
        self.sender_id = sender_id
        self.max_buffered = max_buffered
        self.dropped = 0
        self._connect = connect
        self._drop_log_every = drop_log_every
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._retry_s = retry_min_s
        self._next_attempt = 0.0
        self._buffer: deque[Envelope] = deque()
        self._oona: Oona | None = None
        self._lock = threading.Lock()
        # Connect now, so that a bad URL fails at start-up (BadInputError is not swallowed)
        # and not at the first step; an unreachable bus only means we start buffering.
        with self._lock:
            if not self._reconnect():
                log.warning("oona: bus unreachable at start; buffering up to %d messages",
                            max_buffered)

    @property
    def connected(self) -> bool:
        return self._oona is not None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def publish(self, topic: Topic, message: VersionedContract,
                trace_id: str | None = None) -> str:
        """Publish now if the bus is up, else buffer (an outage never raises); return event id."""
        # Wrapped here, not at flush time: the envelope carries the time of the measurement.
        envelope = Envelope.wrap(topic, message, sender_id=self.sender_id, trace_id=trace_id)
        self.publish_envelope(envelope)
        return envelope.event_id

    def publish_envelope(self, envelope: Envelope) -> None:
        with self._lock:
            self._buffer.append(envelope)
            if len(self._buffer) > self.max_buffered:
                self._buffer.popleft()
                self._count_drop()
            self._drain()

    def flush(self) -> bool:
        """Try to publish everything buffered now, back-off or not; True if nothing is left."""
        with self._lock:
            self._next_attempt = 0.0
            self._drain()
            return not self._buffer

    def close(self) -> None:
        """Flush what can be flushed, then close the connection; what stays buffered is lost."""
        self.flush()
        with self._lock:
            if self._buffer:
                log.warning("oona: closing with %d messages unpublished (bus unreachable)",
                            len(self._buffer))
            if self._oona is not None:
                self._oona.close()
                self._oona = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals (called with the lock held) ------------------------------------------------------
    def _drain(self) -> None:
        if self._oona is None and not self._reconnect():
            return
        while self._buffer:
            batch = list(islice(self._buffer, FLUSH_BATCH))
            try:
                self._oona.publish_envelopes(batch)
            except BusUnavailableError as e:
                # A batch cut short may have landed in part and will be sent again: duplicates
                # are fine (at-least-once, consumers dedupe on event_id), losses are not.
                self._disconnected(str(e))
                return
            for _ in batch:
                self._buffer.popleft()

    def _reconnect(self) -> bool:
        if time.monotonic() < self._next_attempt:
            return False
        try:
            self._oona = self._connect()
        except BusUnavailableError as e:
            self._schedule_retry()
            log.debug("oona: still unreachable: %s", e)
            return False
        if self._buffer:
            log.warning("oona: bus reachable again; publishing %d buffered messages",
                        len(self._buffer))
        self._retry_s = self._retry_min_s
        return True

    def _disconnected(self, reason: str) -> None:
        log.warning("oona: bus unreachable (%s); buffering up to %d messages", reason,
                    self.max_buffered)
        if self._oona is not None:
            self._oona.close()
            self._oona = None
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._next_attempt = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, self._retry_max_s)

    def _count_drop(self) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % self._drop_log_every == 0:
            log.warning("oona: bus unreachable and %d messages buffered: dropped the oldest "
                        "(%d dropped so far)", self.max_buffered, self.dropped)
