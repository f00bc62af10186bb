"""The run's side of the bus: publishing events and reading `control.run`, off the training thread.

    bus = TrainingBus.open(workspace, redis_url, run_id=run_id)
    bus.publish(Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(...))   # never blocks, never raises
    for control in bus.controls():                          # RunControls for this run so far
        ...
    bus.close()                                             # flush what can be flushed

Training must never wait on Redis (DESIGN.md section 6): `publish` only appends to a bounded
queue that a publisher thread drains through a `BufferedPublisher` (which itself buffers, drops
the oldest past its bound and retries with back-off). A listener thread tails `control.run` with
a blocking read and keeps the commands addressed to this run. The publisher thread also beats
on `system.heartbeats` every HEARTBEAT_S (daemon "tolaria", worker the run id), and a last
"stopping" beat on close, so `esper watch` can tell a live run from a dead process; a training
loop that hangs while its process lives shows as a run with no epoch event for too long. If Redis is down, or goes down mid
run, both threads keep trying with back-off; the training loop notices nothing but a counter.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from esper.contracts import DaemonHeartbeat, RunControl, Topic, VersionedContract
from esper.errors import BusUnavailableError, EsperError
from esper.oona import BufferedPublisher, Oona
from esper.workspace import Workspace

log = logging.getLogger("esper.tolaria")

SENDER = "tolaria"
LISTEN_BLOCK_MS = 500
HEARTBEAT_S = 10.0


class TrainingBus:
    """Non-blocking publishing and `control.run` listening for one run."""

    def __init__(self, connect: Callable[[], Oona], *, run_id: str, max_buffered: int = 10_000,
                 listen: bool = True, retry_max_s: float = 5.0) -> None:
        self.run_id = run_id
        self.max_buffered = max_buffered
        self.dropped = 0            # dropped here, before reaching the publisher's own buffer
        self.published = 0          # handed to the publisher
        self.received = 0           # RunControls for this run read from control.run
        self._connect = connect
        self._retry_max_s = retry_max_s
        self._queue: deque[tuple[Topic, VersionedContract]] = deque()
        self._controls: deque[RunControl] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._publisher: BufferedPublisher | None = None
        self._attempted = threading.Event()  # the publisher thread has tried to connect once
        # Only commands issued from now on (entry ids carry the server's clock, in ms).
        self._since = f"{int(time.time() * 1000) - 1}-0"
        self._started = time.monotonic()
        self._last_beat: float | None = None
        self._threads = [threading.Thread(target=self._publish_loop, name="tolaria-bus-publish",
                                          daemon=True)]
        if listen:
            self._threads.append(threading.Thread(target=self._listen_loop,
                                                  name="tolaria-bus-listen", daemon=True))
        for thread in self._threads:
            thread.start()

    @classmethod
    def open(cls, workspace: Workspace | None, redis_url: str | None, *, run_id: str,
             **kwargs) -> TrainingBus:
        """The bus at `redis_url`, else the workspace's embedded one (started if need be)."""
        if not redis_url and workspace is None:
            raise EsperError("no Redis URL and no workspace: nowhere to publish")
        return cls(lambda: Oona.connect(workspace, redis_url, sender_id=SENDER), run_id=run_id,
                   **kwargs)

    # --- the training thread's side -------------------------------------------------------

    def publish(self, topic: Topic, message: VersionedContract) -> None:
        """Queue a message for the publisher thread; the oldest is dropped past the bound."""
        with self._wake:
            self._queue.append((topic, message))
            if len(self._queue) > self.max_buffered:
                self._queue.popleft()
                self.dropped += 1
            self._wake.notify_all()

    def controls(self) -> list[RunControl]:
        """The RunControls for this run received since the last call, in order."""
        out = []
        while self._controls:
            out.append(self._controls.popleft())
        return out

    @property
    def pending(self) -> int:
        """Messages not yet handed to Redis (queued here or buffered by the publisher)."""
        buffered = self._publisher.buffered if self._publisher is not None else 0
        return len(self._queue) + buffered

    @property
    def connected(self) -> bool:
        return self._publisher is not None and self._publisher.connected

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to `timeout` s for everything queued to reach Redis; True if it did."""
        deadline = time.monotonic() + timeout
        self._attempted.wait(timeout)
        while time.monotonic() < deadline and self._publisher is not None:
            with self._wake:
                self._wake.notify_all()
            if not self._queue and self._publisher.flush():
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Flush for up to `timeout` s, then stop both threads; what is left unpublished is lost
        (nothing that matters lives only on the bus)."""
        if self._closed:
            return
        self.publish(Topic.SYSTEM_HEARTBEATS, self._heartbeat("stopping"))
        self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=LISTEN_BLOCK_MS / 1000 * 4)
        if self._publisher is not None:
            try:
                self._publisher.close()
            except EsperError as e:
                log.warning("tolaria: closing the bus: %s", e)
        lost = len(self._queue) + (self._publisher.buffered if self._publisher else 0)
        if lost or self.dropped:
            log.warning("tolaria: %d bus message(s) unpublished, %d dropped (Redis unreachable)",
                        lost, self.dropped + (self._publisher.dropped if self._publisher else 0))

    # --- threads --------------------------------------------------------------------------

    def _publish_loop(self) -> None:
        retry = 0.2
        while not self._closed and self._publisher is None:
            try:
                self._publisher = BufferedPublisher(self._connect, sender_id=SENDER,
                                                    max_buffered=self.max_buffered,
                                                    retry_min_s=0.5, retry_max_s=self._retry_max_s)
            except EsperError as e:  # a bad URL or refused credentials: say so, keep training
                if not self._attempted.is_set():
                    log.warning("tolaria: not publishing to the bus: %s", e)
                self._attempted.set()
                with self._wake:
                    self._wake.wait(retry)
                retry = min(retry * 2, self._retry_max_s)
        self._attempted.set()
        publisher = self._publisher
        while publisher is not None:
            if self._beat_due():
                publisher.publish(Topic.SYSTEM_HEARTBEATS, self._heartbeat("busy"))
                self._last_beat = time.monotonic()
            with self._wake:
                while not self._queue and not self._closed:
                    # Wake now and then to retry what the publisher buffered during an outage,
                    # and to beat.
                    if not self._wake.wait(1.0) and (publisher.buffered or self._beat_due()):
                        break
                if self._closed and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            for topic, message in batch:
                publisher.publish(topic, message)
                self.published += 1
            if not batch and publisher.buffered:
                publisher.flush()

    def _beat_due(self) -> bool:
        return self._last_beat is None or time.monotonic() - self._last_beat >= HEARTBEAT_S

    def _heartbeat(self, state: str) -> DaemonHeartbeat:
        return DaemonHeartbeat(daemon=SENDER, worker_id=self.run_id, host=socket.gethostname(),
                               pid=os.getpid(), state=state, interval_s=HEARTBEAT_S,
                               uptime_s=round(time.monotonic() - self._started, 3),
                               published={"events": self.published})

    def _listen_loop(self) -> None:
        oona: Oona | None = None
        retry = 0.2
        while not self._closed:
            try:
                if oona is None:
                    oona = self._connect()
                    retry = 0.2
                entries = oona.tail([Topic.CONTROL_RUN], since=self._since, block_ms=LISTEN_BLOCK_MS)
            except (BusUnavailableError, EsperError) as e:
                if oona is not None:
                    oona.close()
                    oona = None
                log.debug("tolaria: control.run unreachable: %s", e)
                with self._wake:
                    self._wake.wait(retry)
                retry = min(retry * 2, self._retry_max_s)
                continue
            for entry in entries:
                self._since = entry.entry_id
                message = entry.envelope.message
                if isinstance(message, RunControl) and message.run_id == self.run_id:
                    self._controls.append(message)
                    self.received += 1
        if oona is not None:
            oona.close()
