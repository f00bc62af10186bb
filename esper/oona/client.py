"""Oona's client: publish envelopes, read streams, open consumer groups (DESIGN.md section 6).

One client for both buses: `Oona.connect(workspace)` talks to the workspace's embedded
redis-server over its Unix socket; `Oona.connect(workspace, url)` talks to an external Redis
(`redis://`, `rediss://`, `unix://`, with a password in the URL). Past `connect` the code is
the same.

Failures: a malformed URL is a BadInputError, as are credentials the server refuses; a server
that cannot be reached is a BusUnavailableError. When the embedded server dies under a live
client, the next call restarts it (the AOF brings the streams back) and retries once, so a
long-running daemon does not have to be restarted with it. A retried write may land twice:
delivery is at-least-once, and consumers are idempotent on `event_id`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from esper.contracts import Envelope, Topic, VersionedContract
from esper.errors import BadInputError, BusUnavailableError
from esper.oona.consumer import Consumer
from esper.oona.embedded import embedded_running, ensure_embedded
from esper.oona.streams import (
    ENVELOPE_FIELD,
    TELEMETRY_RETENTION,
    TOPIC_BY_STREAM_KEY,
    DeadLetter,
    Entry,
    block_argument,
    dead_letter_key,
    min_id_for_age,
    parse_envelope,
    text,
)
from esper.workspace import Workspace

log = logging.getLogger("esper.oona")
T = TypeVar("T")

URL_SCHEMES = ("redis", "rediss", "unix")
# Streams need XAUTOCLAIM and XADD ... MINID, both new in Redis 6.2.
MIN_REDIS_VERSION = (6, 2)
CONNECT_TIMEOUT_S = 2.0
# A command that takes longer than this means the server or the network is gone. Blocking reads
# wait at most MAX_BLOCK_MS (streams.py), well inside it, so they never trip it.
SOCKET_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class GroupInfo:
    """One consumer group of a stream, as XINFO GROUPS reports it."""

    name: str
    consumers: int
    pending: int  # delivered but not yet acknowledged
    last_delivered_id: str
    lag: int | None  # entries not yet delivered; Redis 7+ only, None on 6.2 or when unknown


class Oona:
    """A connection to the bus for one sender. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, *, sender_id: str, where: str,
                 embedded_in: Workspace | None = None):
        self._client = client
        self.sender_id = sender_id
        self.where = where  # "Redis at <url>", for messages: never holds a password
        self._embedded_in = embedded_in  # set when the server is one we may restart

    @classmethod
    def connect(cls, workspace: Workspace | None, url: str | None = None, *,
                sender_id: str) -> Oona:
        """Connect to the Redis at `url`, or with no URL to the workspace's embedded one."""
        if url:
            client, where, embedded_in = _client_for_url(url), f"Redis at {redact_url(url)}", None
        elif workspace is None:
            raise BadInputError("no Redis URL and no workspace: the embedded bus lives in a "
                                "workspace (pass --workspace or --redis-url)")
        else:
            socket_path = ensure_embedded(workspace).socket_path
            client = redis.Redis(unix_socket_path=str(socket_path), **_client_options(tcp=False))
            where, embedded_in = f"the embedded Redis at {socket_path}", workspace
        oona = cls(client, sender_id=sender_id, where=where, embedded_in=embedded_in)
        try:
            oona._check_server()
        except BaseException:
            oona.close()
            raise
        return oona

    @classmethod
    def connect_if_running(cls, workspace: Workspace, url: str | None = None, *,
                           sender_id: str) -> Oona | None:
        """Like `connect`, but with no URL only if the embedded server is already up; else None.

        For notices that only matter to someone already listening: anyone listening on the
        embedded bus would have started it.
        """
        if not url and not embedded_running(workspace):
            return None
        return cls.connect(workspace, url, sender_id=sender_id)

    @property
    def redis(self) -> redis.Redis:
        """The underlying redis-py client, for administration and tests."""
        return self._client

    def execute(self, op: Callable[[redis.Redis], T]) -> T:
        """Run `op` against Redis, turning connection failures into Esper errors.

        The one path every command takes. On the embedded bus a lost connection means the server
        died: restart it and run `op` once more.
        """
        try:
            return op(self._client)
        except redis.AuthenticationError as e:
            raise BadInputError(f"{self.where} refused the credentials: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if self._embedded_in is None:
                raise BusUnavailableError(f"{self.where} is unreachable: {e}") from None
            log.warning("oona: lost the embedded Redis (%s); restarting it", e)
        ensure_embedded(self._embedded_in)
        try:
            return op(self._client)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BusUnavailableError(f"{self.where} is unreachable even after a restart: "
                                      f"{e}") from None

    # Publishing ---------------------------------------------------------------------------------
    def publish(self, topic: Topic, message: VersionedContract,
                trace_id: str | None = None) -> str:
        """Wrap `message` in an envelope, append it to the topic's stream; return the event id."""
        return self.publish_envelope(self.wrap(topic, message, trace_id))

    def publish_many(self, messages: Iterable[tuple[Topic, VersionedContract]],
                     trace_id: str | None = None) -> list[str]:
        """Publish many messages in one pipelined round trip; returns their event ids in order."""
        return self.publish_envelopes([self.wrap(t, m, trace_id) for t, m in messages])

    def publish_envelope(self, envelope: Envelope) -> str:
        """Append a ready envelope (one XADD); returns its event id."""
        key, fields, trim = _xadd_arguments(envelope)
        self.execute(lambda r: r.xadd(key, fields, **trim))
        return envelope.event_id

    def publish_envelopes(self, envelopes: Sequence[Envelope]) -> list[str]:
        """Append ready envelopes in one pipelined round trip (no MULTI); return their event ids."""
        commands = [_xadd_arguments(envelope) for envelope in envelopes]

        def send(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for key, fields, trim in commands:
                pipe.xadd(key, fields, **trim)
            return pipe.execute()

        if commands:
            self.execute(send)
        return [envelope.event_id for envelope in envelopes]

    def wrap(self, topic: Topic, message: VersionedContract,
             trace_id: str | None = None) -> Envelope:
        """The envelope this client would publish `message` in (sender, fresh event id, now)."""
        return Envelope.wrap(topic, message, sender_id=self.sender_id, trace_id=trace_id)

    def trim_by_age(self, topic: Topic, max_age: timedelta | None = None) -> int:
        """Delete entries older than `max_age` (default: the topic's retention); return how many.

        Exact trimming against the server's clock: entry ids carry the server's time.
        """
        if max_age is None:
            if topic not in TELEMETRY_RETENTION:
                raise ValueError(f"topic {topic.value} has no default retention: pass max_age")
            max_age = TELEMETRY_RETENTION[topic]
        seconds, micros = self.execute(lambda r: r.time())
        min_id = min_id_for_age(max_age, now_ms=seconds * 1000 + micros // 1000)
        return self.execute(lambda r: r.xtrim(topic.stream_key, minid=min_id, approximate=False))

    # Observing without consuming ----------------------------------------------------------------
    def tail(self, topics: Sequence[Topic], since: str | Mapping[Topic, str] = "$", *,
             block_ms: int | None = None, count: int = 100) -> list[Entry]:
        """Entries after `since` (one id for every topic, or one per topic), by plain XREAD.

        No consumer group, nothing acknowledged: for observers such as `esper watch`. "$" means
        "only what arrives from now on", so a tailing loop passes back the last entry id it saw
        per topic. `block_ms` waits for new entries (None: answer at once). Entries that hold no
        valid envelope are skipped with a warning.
        """
        streams = {t.stream_key: (since if isinstance(since, str) else since.get(t, "$"))
                   for t in topics}
        block = block_argument(block_ms)
        reply = self.execute(lambda r: r.xread(streams, count=count, block=block))
        entries = []
        for key, stream_entries in reply or []:
            topic = TOPIC_BY_STREAM_KEY[text(key)]
            entries.extend(self._entries(topic, stream_entries))
        return entries

    def range(self, topic: Topic, start: str = "-", end: str = "+", count: int | None = None, *,
              reverse: bool = False) -> list[Entry]:
        """Entries of one topic between two ids (XRANGE; newest first with `reverse`, XREVRANGE)."""
        key = topic.stream_key
        if reverse:  # XREVRANGE takes the high id first
            reply = self.execute(lambda r: r.xrevrange(key, max=end, min=start, count=count))
        else:
            reply = self.execute(lambda r: r.xrange(key, min=start, max=end, count=count))
        return self._entries(topic, reply)

    def group_info(self, topic: Topic) -> list[GroupInfo]:
        """The consumer groups reading a topic: pending counts, lag, consumers (XINFO GROUPS)."""
        try:
            groups = self.execute(lambda r: r.xinfo_groups(topic.stream_key))
        except redis.ResponseError:
            return []  # no such stream yet: nobody has published or subscribed
        return [GroupInfo(name=text(g["name"]), consumers=int(g["consumers"]),
                          pending=int(g["pending"]),
                          last_delivered_id=text(g["last-delivered-id"]),
                          lag=None if g.get("lag") is None else int(g["lag"]))
                for g in groups]

    def dead_letters(self, topic: Topic, count: int | None = 100) -> list[DeadLetter]:
        """The oldest `count` entries of the topic's dead-letter stream."""
        reply = self.execute(lambda r: r.xrange(dead_letter_key(topic), count=count))
        return [DeadLetter.from_fields(text(entry_id), fields) for entry_id, fields in reply]

    # Consuming ----------------------------------------------------------------------------------
    def consumer(self, group: str, topics: Sequence[Topic], consumer_name: str, *,
                 max_deliveries: int = 5, claim_idle_ms: int = 30_000,
                 start_id: str = "0") -> Consumer:
        """Join (creating if needed) the consumer group `group` on `topics` as `consumer_name`."""
        return Consumer(self, group, list(topics), consumer_name, max_deliveries=max_deliveries,
                        claim_idle_ms=claim_idle_ms, start_id=start_id)

    # Life ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_server(self) -> None:
        info = self.execute(lambda r: r.info("server"))
        version = str(info.get("redis_version", "0.0"))
        found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
        if found < MIN_REDIS_VERSION:
            raise BusUnavailableError(f"{self.where} is version {version}; Oona needs "
                                      f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer")

    def _entries(self, topic: Topic,
                 reply: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> list[Entry]:
        entries = []
        for raw_id, fields in reply:
            entry_id = text(raw_id)
            try:
                entries.append(Entry(entry_id, parse_envelope(topic, entry_id, fields)))
            except BadInputError as e:
                log.warning("oona: skipping an entry with no valid envelope: %s", e)
        return entries


def _xadd_arguments(envelope: Envelope) -> tuple[str, dict[bytes, str], dict[str, Any]]:
    """Key, fields and trim options of the XADD that publishes `envelope`."""
    trim: dict[str, Any] = {}
    retention = TELEMETRY_RETENTION.get(envelope.topic)
    if retention is not None:
        # Trim telemetry as we go: "~" lets Redis drop only whole internal nodes, which is
        # nearly free; trim_by_age is the exact version.
        trim = {"minid": min_id_for_age(retention), "approximate": True}
    return envelope.topic.stream_key, {ENVELOPE_FIELD: envelope.to_json()}, trim


def _client_options(*, tcp: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        # RESP2: the reply shapes this package parses (redis-py 8 defaults to RESP3).
        "protocol": 2,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        # A few quick retries ride out a blip; a dead server fails in well under a second
        # (redis-py's default would keep a publisher in training waiting for seconds).
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), retries=3),
    }
    if tcp:  # notice a peer that vanished without closing (a Unix socket connection refuses it)
        options["socket_keepalive"] = True
    return options


# URLs -------------------------------------------------------------------------------------------

def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, fit for a message or a log line."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(//[^/@:]*:)[^@/]*@", r"\1***@", url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


def check_url(url: str) -> None:
    """BadInputError naming what is wrong with a Redis URL; nothing connects. For a command
    that must refuse a malformed URL before it starts, not find out from a background thread."""
    _client_for_url(url).close()


def _client_for_url(url: str) -> redis.Redis:
    try:
        scheme = _checked_scheme(url)
        return redis.Redis.from_url(url, **_client_options(tcp=scheme != "unix"))
    except ValueError as e:
        reason = str(e)
        password = _password_of(url)
        if password:
            reason = reason.replace(password, "***")
        raise BadInputError(f"bad Redis URL '{redact_url(url)}': {reason}") from None


def _checked_scheme(url: str) -> str:
    """The URL's scheme, or a ValueError naming what is wrong (redis-py lets some through)."""
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ValueError("the scheme must be redis://, rediss:// or unix://")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path")
        return parts.scheme
    if not parts.hostname:
        raise ValueError("no host")
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    return parts.scheme


def _password_of(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
