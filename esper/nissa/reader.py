"""The watcher's side of the bus: tail and range reads and XINFO, never a consumer group.

`esper watch` must not take work from anyone: it reads streams with XRANGE/XREVRANGE/XREAD
(no group, nothing acknowledged) and looks at the groups of others through XINFO GROUPS. It
rides out the bus going away: the embedded server is restarted by Oona on the next call, an
external one is retried every `RECONNECT_S` while the dashboard shows that it is down.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from esper.contracts import Topic, VersionedContract
from esper.errors import BadInputError, BusUnavailableError
from esper.oona import Entry, GroupInfo, Oona
from esper.workspace import Workspace

log = logging.getLogger("esper.nissa")

# Everything on the bus is worth showing; the hierarchy topics are read but rarely written.
WATCHED_TOPICS: tuple[Topic, ...] = tuple(Topic)
# How often a bus that failed is tried again.
RECONNECT_S = 1.0
# Entries per topic read at start (the newest ones after --since).
BACKLOG_PER_TOPIC = 2000
# Topics the dashboard samples instead of reading every entry: per-layer telemetry arrives by
# the hundred per second and each entry is a few KB, while the dashboard only needs the newest
# HealthSignal of each layer (transitions, read in full, say when a seed changes stage).
SAMPLED_TOPICS: tuple[Topic, ...] = (Topic.TELEMETRY_SEED_HEALTH,)
# Sampled too when no metrics are served (their epoch-time histogram wants every event): the
# dashboard shows each run's latest epoch only.
SAMPLED_WITHOUT_METRICS: tuple[Topic, ...] = (Topic.TELEMETRY_SEED_HEALTH,
                                              Topic.SYSTEM_EVENTS_EPOCH)
# The newest entries of a sampled topic read per sample: enough for the latest signal of every
# layer of a few runs; layers older than that keep what an earlier sample said.
SAMPLE_COUNT = 128

# Redis 6.2 does not report a group's lag: it is counted inside Redis (the entries never cross
# the wire), up to this many.
LAG_COUNT_CAP = 100_000
_COUNT_AFTER = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
return #entries
"""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, *, now: float | None = None) -> int:
    """`--since` as a stream-id time in ms: a duration back from now (`90s`, `15m`, `2h`, `1d`),
    an ISO-8601 time (UTC unless it says otherwise), or `all`."""
    now = time.time() if now is None else now
    text = text.strip()
    if text == "all":
        return 0
    match = _DURATION.match(text)
    if match:
        return max(0, int((now - float(match[1]) * _UNIT_S[match[2]]) * 1000))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadInputError(f"--since '{text}': give a duration (90s, 15m, 2h, 1d), an ISO time "
                            "or 'all'") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0, int(moment.timestamp() * 1000))


def entry_order(entry: Entry) -> tuple[int, int]:
    ms, _, seq = entry.entry_id.partition("-")
    return int(ms), int(seq or 0)


class BusReader:
    """Reads `topics` for one watcher. Every method answers even when the bus is down: empty
    results, with `error` saying why."""

    def __init__(self, workspace: Workspace | None, url: str | None, topics: Sequence[Topic], *,
                 start_embedded: bool = True, sampled: Sequence[Topic] = (),
                 warn_when_down: bool = True):
        self.workspace = workspace
        self.url = url
        self.topics = list(topics)
        # Topics read by `sample` (newest entries only), never by `poll`.
        self.sampled = [t for t in self.topics if t in sampled]
        self.tailed = [t for t in self.topics if t not in sampled]
        self.start_embedded = start_embedded
        # A follower logs the bus going down and keeps retrying; a one-shot read leaves `error`
        # to its caller to report.
        self.warn_when_down = warn_when_down
        self.error: str | None = None
        # True while `error` is a bus that did not answer; False for the embedded bus merely not
        # running, where a reader that starts none finds nothing to read and nothing failed.
        self.unreachable = False
        self.reconnects = 0
        self._oona: Oona | None = None
        self._next_try = 0.0
        self._last: dict[Topic, str] = {}
        self.sender_id = f"nissa-{socket.gethostname()}-{os.getpid()}"

    # Connection ---------------------------------------------------------------------------------
    def bus(self) -> Oona | None:
        """The connection, (re)opened if it is time to try; None while the bus is down."""
        if time.monotonic() < self._next_try:
            return None
        if self._oona is not None:
            return self._oona
        try:
            if self.start_embedded:
                self._oona = Oona.connect(self.workspace, self.url, sender_id=self.sender_id)
            else:
                self._oona = Oona.connect_if_running(self.workspace, self.url,
                                                     sender_id=self.sender_id)
                if self._oona is None:
                    self.error = "the workspace's embedded bus is not running"
                    self.unreachable = False
                    self._next_try = time.monotonic() + RECONNECT_S
                    return None
        except BusUnavailableError as e:
            self._down(e)
            return None
        if self.error is not None:
            self.reconnects += 1
            log.info("nissa: the bus answers again")
        self.error = None
        self.unreachable = False
        return self._oona

    def _down(self, error: Exception) -> None:
        if self.error is None and self.warn_when_down:
            log.warning("nissa: %s; retrying every %g s", error, RECONNECT_S)
        self.error = str(error)
        self.unreachable = True
        self._next_try = time.monotonic() + RECONNECT_S

    def _call(self, op, default):
        oona = self.bus()
        if oona is None:
            return default
        try:
            result = op(oona)
        except BusUnavailableError as e:
            self._down(e)
            return default
        if self.error is not None:  # an embedded restart inside Oona.execute, or a blip
            self.reconnects += 1
            self.error = None
            self.unreachable = False
        return result

    def close(self) -> None:
        if self._oona is not None:
            self._oona.close()
            self._oona = None

    # Reading ------------------------------------------------------------------------------------
    def backlog(self, since_ms: int, limit: int = BACKLOG_PER_TOPIC) -> list[Entry]:
        """The newest `limit` entries of each topic written since `since_ms` (`SAMPLE_COUNT` of a
        sampled topic), oldest first; later `poll`s and `sample`s continue from there."""
        start = f"{since_ms}-0"

        def read(oona: Oona) -> list[Entry]:
            entries: list[Entry] = []
            for topic in self.topics:
                count = SAMPLE_COUNT if topic in self.sampled else limit
                newest = oona.range(topic, start=start, count=count, reverse=True)
                entries.extend(reversed(newest))
                self._last[topic] = newest[0].entry_id if newest else start
            return entries

        entries = self._call(read, [])
        return sorted(entries, key=entry_order)

    def poll(self, block_ms: int | None = None, count: int = 1000) -> list[Entry]:
        """Entries of the tailed (not sampled) topics that arrived since the last read (XREAD, no
        group), oldest first; at most `count` per topic."""
        if not self._last:
            self._last = {topic: "$" for topic in self.topics}
        if not self.tailed:
            if block_ms:
                time.sleep(block_ms / 1000)
            return []

        def read(oona: Oona) -> list[Entry]:
            return oona.tail(self.tailed, since={t: self._last[t] for t in self.tailed},
                             block_ms=block_ms, count=count)

        entries = self._call(read, None)
        if entries is None:
            if block_ms:
                time.sleep(min(block_ms / 1000, RECONNECT_S))
            return []
        for entry in entries:
            self._last[entry.envelope.topic] = entry.entry_id
        if any(v == "$" for v in self._last.values()):
            # "$" means "from now" at each call: pin it to the stream's end so nothing is missed.
            self._pin_ends()
        return sorted(entries, key=entry_order)

    def drain(self, count: int = 1000, max_reads: int = 100) -> list[Entry]:
        """Everything the tailed topics hold since the last read, without waiting: XREADs of
        `count` per topic until one comes back short (at most `max_reads`), oldest first."""
        entries: list[Entry] = []
        for _ in range(max_reads):
            batch = self.poll(count=count)
            entries += batch
            if len(batch) < count:
                break
        return sorted(entries, key=entry_order)

    def sample(self, count: int = SAMPLE_COUNT) -> list[Entry]:
        """The newest `count` entries of each sampled topic written since the last sample
        (XREVRANGE down to the last id seen, exclusive), oldest first; older ones are skipped:
        never transferred, never parsed."""
        if not self.sampled:
            return []
        if not self._last:
            self._last = {topic: "$" for topic in self.topics}
            self._pin_ends()

        def read(oona: Oona) -> list[Entry]:
            entries: list[Entry] = []
            for topic in self.sampled:
                last = self._last.get(topic, "$")
                start = "-" if last in ("$", "0-0") else f"({last}"
                newest = oona.range(topic, start=start, count=count, reverse=True)
                if newest:
                    self._last[topic] = newest[0].entry_id
                entries.extend(reversed(newest))
            return entries

        return sorted(self._call(read, []), key=entry_order)

    def _pin_ends(self) -> None:
        def ends(oona: Oona) -> dict[Topic, str]:
            found = {}
            for topic, last in self._last.items():
                if last == "$":
                    newest = oona.range(topic, count=1, reverse=True)
                    found[topic] = newest[0].entry_id if newest else "0-0"
            return found

        self._last.update(self._call(ends, {}))

    def groups(self) -> dict[Topic, list[GroupInfo]]:
        """Every consumer group on the watched topics (XINFO GROUPS: pending, lag)."""
        def read(oona: Oona) -> dict[Topic, list[GroupInfo]]:
            found = {}
            for topic in self.topics:
                groups = oona.group_info(topic)
                if groups:
                    found[topic] = [g if g.lag is not None else
                                    replace(g, lag=_count_after(oona, topic, g.last_delivered_id))
                                    for g in groups]
            return found

        return self._call(read, {})

    def lengths(self) -> dict[Topic, int]:
        """Entries held in each watched stream (XLEN)."""
        def read(oona: Oona) -> dict[Topic, int]:
            keys = [t.stream_key for t in self.topics]

            def xlen(r):
                pipe = r.pipeline(transaction=False)
                for key in keys:
                    pipe.xlen(key)
                return pipe.execute()
            return dict(zip(self.topics, oona.execute(xlen)))

        return self._call(read, {})

    def publish(self, topic: Topic, message: VersionedContract) -> None:
        """Best effort: an alert that cannot be published is still shown and exit-coded."""
        self._call(lambda oona: oona.publish(topic, message), None)


def _count_after(oona: Oona, topic: Topic, last_id: str) -> int:
    """Entries of `topic` after `last_id` (a group's lag on Redis 6.2), counted server-side."""
    start = "-" if last_id == "0-0" else f"({last_id}"
    return int(oona.execute(lambda r: r.eval(_COUNT_AFTER, 1, topic.stream_key, start,
                                             LAG_COUNT_CAP)))
