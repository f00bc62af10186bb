"""A background daemon's link to the bus (the forge's and the bench's): woken early by one topic,
publishing its results, riding out a bus that goes away.

The catalog is the record and the daemons poll it, so the bus is best effort: when it fails the
daemon warns once, keeps polling Urza, and tries the bus again every `RETRY_S`.

Heartbeats (topic system.heartbeats, for `esper watch`) ride the daemon's own loop, not a
thread: a beat every `HEARTBEAT_S` while it waits for work, one after each result it publishes,
and a last one ("stopping") when a stop request ends its wait or the daemon exits (`stopped`:
a `--once` run whose work is done). A loop that hangs stops beating, which is what the watcher's
stalled-daemon alert looks for; a single job longer than the alert's threshold looks stalled
too, so the threshold must exceed the longest job (the forge's and the bench's wall limits).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import redis

from esper.contracts import DaemonHeartbeat, Topic, VersionedContract
from esper.errors import BusUnavailableError
from esper.oona import Consumer, Oona
from esper.workspace import Workspace

# How long a wait on the bus blocks at once: a signal is noticed within this.
WAIT_SLICE_S = 0.5
# After the bus failed, try it again this often (a connect to a dead host costs seconds).
RETRY_S = 30.0
# A beat this often while idle; `esper watch` alerts after several are missed.
HEARTBEAT_S = 10.0
# Heartbeats older than this are trimmed from the stream (checked about once an hour).
HEARTBEAT_RETENTION = timedelta(hours=24)
TRIM_EVERY_S = 3600.0


def connect(workspace: Workspace, redis_url: str | None, *, worker_id: str, once: bool,
            log: logging.Logger, poll_interval_s: float) -> Oona | None:
    """The daemon's bus, or None when it cannot be reached (the daemon then only polls Urza).

    A daemon starts the workspace's embedded bus if it is not running: it listens on it. A
    `--once` run only uses a bus that is already up: anyone listening would have started it.
    A malformed URL is bad input (exit 2), raised before anything is claimed.
    """
    try:
        if once:
            return Oona.connect_if_running(workspace, redis_url, sender_id=worker_id)
        return Oona.connect(workspace, redis_url, sender_id=worker_id)
    except BusUnavailableError as e:
        log.warning("%s: %s; polling Urza every %g s instead", log.name.removeprefix("esper."),
                    e, poll_interval_s)
        return None


class DaemonBus:
    def __init__(self, bus: Oona | None, *, group: str, wake_topic: Topic, worker_id: str,
                 log: logging.Logger, poll_interval_s: float):
        self.bus = bus
        self.group = group
        self.wake_topic = wake_topic
        self.worker_id = worker_id
        self.log = log
        self.poll_interval_s = poll_interval_s
        self.heartbeat_interval_s = HEARTBEAT_S
        self._consumer: Consumer | None = None
        self._down_since: float | None = None
        self._started = time.monotonic()
        self._last_beat: float | None = None
        self._said_stopping = False
        self._last_trim: float | None = None
        self._published: Counter[str] = Counter()

    def wait(self, stopping: Callable[[], bool]) -> None:
        """Return when a `wake_topic` notice arrives, the poll interval is over, or `stopping()`."""
        deadline = time.monotonic() + self.poll_interval_s
        while True:
            if stopping():
                self.heartbeat("stopping")
                return
            self._beat_if_due("idle")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            consumer = self._wake_consumer()
            if consumer is None:
                time.sleep(min(WAIT_SLICE_S, remaining))
                continue
            woken: list[str] = []
            try:
                consumer.process(lambda envelope, woken=woken: woken.append(envelope.event_id),
                                 block_ms=max(1, int(min(WAIT_SLICE_S, remaining) * 1000)))
            except (BusUnavailableError, redis.ResponseError) as e:  # gone, or flushed (NOGROUP)
                self._failed(e)
                continue
            if woken:
                return

    def publish(self, topic: Topic, message: VersionedContract) -> None:
        if self.bus is None:
            return
        try:
            self.bus.publish(topic, message)
        except BusUnavailableError as e:
            self._failed(e)
            return
        self._back()
        self._published[topic.value] += 1
        self.heartbeat("busy")

    def stopped(self) -> None:
        """The daemon is exiting: a last "stopping" beat, unless one was sent or the watcher never
        saw it beat. Without it, a `--once` run that simply finished reads as a stalled daemon."""
        if self._last_beat is not None and not self._said_stopping:
            self.heartbeat("stopping")

    def heartbeat(self, state: str) -> None:
        """Publish a DaemonHeartbeat now (best effort, like every publish here)."""
        if self.bus is None or self._down_since is not None:
            return  # a bus that failed is retried by `wait`, not by every beat
        now = time.monotonic()
        beat = DaemonHeartbeat(daemon=self.group, worker_id=self.worker_id,
                               host=socket.gethostname(), pid=os.getpid(), state=state,
                               interval_s=self.heartbeat_interval_s,
                               uptime_s=round(now - self._started, 3),
                               published=dict(self._published))
        try:
            self.bus.publish(Topic.SYSTEM_HEARTBEATS, beat)
            if self._last_trim is None or now - self._last_trim > TRIM_EVERY_S:
                self._last_trim = now
                self.bus.trim_by_age(Topic.SYSTEM_HEARTBEATS, HEARTBEAT_RETENTION)
        except BusUnavailableError as e:
            self._failed(e)
            return
        self._last_beat = now
        self._said_stopping = state == "stopping"

    def _beat_if_due(self, state: str) -> None:
        if self._last_beat is None or time.monotonic() - self._last_beat >= self.heartbeat_interval_s:
            self.heartbeat(state)

    def _wake_consumer(self) -> Consumer | None:
        if self.bus is None:
            return None
        if self._consumer is None:
            if self._down_since is not None and time.monotonic() - self._down_since < RETRY_S:
                return None
            try:
                self._consumer = self.bus.consumer(self.group, [self.wake_topic], self.worker_id)
            except BusUnavailableError as e:
                self._failed(e)
                return None
            self._back()
        return self._consumer

    def _failed(self, error: Exception) -> None:
        self._consumer = None
        if self._down_since is None:
            self.log.warning("%s: %s; polling Urza every %g s (nothing is lost: the catalog is "
                             "the record)", self.group, error, self.poll_interval_s)
        self._down_since = time.monotonic()

    def _back(self) -> None:
        if self._down_since is not None:
            self.log.info("%s: the bus answers again", self.group)
            self._down_since = None
