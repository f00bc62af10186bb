"""Publishing and consuming on real servers: the embedded one, and an external one reached by URL.

The external server is the same redis-server binary on a free TCP port with `--requirepass`,
reached through `redis://:<password>@127.0.0.1:<port>`: the path Esper takes across machines.
A third bus is the embedded server named by a `unix://` URL. All three run the same tests
through the same client code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from esper.contracts import (
    Envelope,
    EpochEvent,
    HealthSignal,
    RunControl,
    RunControlAction,
    SeedLifecycle,
    Topic,
)
from esper.errors import BadInputError, BusUnavailableError
from esper.oona import (
    BufferedPublisher,
    Consumer,
    Oona,
    dead_letter_key,
    ensure_embedded,
    stop_embedded,
)
from esper.oona.embedded import read_pid, redis_server_binary
from esper.workspace import Workspace

PASSWORD = "s3cret-pw"


# Servers -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExternalRedis:
    """A password-protected redis-server on a TCP port, owned by one test."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> ExternalRedis:
        self.proc = subprocess.Popen(
            [str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=PASSWORD, protocol=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def scratch():
    """A short directory under /tmp: Unix socket paths are limited to ~107 bytes."""
    root = Path(tempfile.mkdtemp(prefix="oona-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workspace(scratch):
    ws = Workspace(scratch / "ws")
    ws.create()
    yield ws
    stop_embedded(ws)


@pytest.fixture
def external(scratch):
    server = ExternalRedis(scratch).start()
    yield server
    server.stop()


@dataclass
class Bus:
    """Where a test's processes meet: a workspace's embedded server, or a URL."""

    workspace: Workspace | None
    url: str | None

    def connect(self, sender_id: str) -> Oona:
        return Oona.connect(self.workspace, self.url, sender_id=sender_id)

    def argv(self) -> list[str]:
        return [str(self.workspace.root) if self.workspace else "", self.url or ""]


@pytest.fixture(params=["embedded", "external", "unix-url"])
def bus(request, scratch) -> Bus:
    if request.param == "embedded":
        return Bus(request.getfixturevalue("workspace"), None)
    if request.param == "external":
        return Bus(None, request.getfixturevalue("external").url)
    # The embedded server named by a unix:// URL: the external path over a Unix socket.
    socket_path = ensure_embedded(request.getfixturevalue("workspace")).socket_path
    return Bus(None, f"unix://{socket_path}")


# Messages and a real idempotency ledger ----------------------------------------------------------

def _epoch(n: int) -> EpochEvent:
    return EpochEvent(run_id="run-1", epoch=n, global_step=100 * n, train_loss=1.0 / (n + 1),
                      validation_loss=1.0)


def _health(step: int, seeds: int = 64) -> HealthSignal:
    return HealthSignal(run_id="run-1", layer_id=0, layer_name="mlp.0", epoch=0, step=step,
                        lifecycle=[SeedLifecycle.DORMANT] * seeds,
                        activation_mean=[0.1] * seeds, activation_variance=[0.01] * seeds,
                        dead_ratio=[0.0] * seeds, gradient_energy=[0.5] * seeds,
                        is_ready_for_transition=[False] * seeds)


def _pause() -> RunControl:
    return RunControl(run_id="run-1", action=RunControlAction.PAUSE, reason="operator")


class SqliteLedger:
    """The IdempotencyLedger protocol on a real SQLite file: an effect and its record commit
    in one transaction, the way Urza's `processed_events` does it."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("CREATE TABLE processed_events "
                        "(group_name TEXT, event_id TEXT, PRIMARY KEY (group_name, event_id))")
        self.db.execute("CREATE TABLE effects (event_id TEXT)")

    def run_once(self, group: str, event_id: str, effect: Callable[[], None]) -> bool:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            seen = self.db.execute("SELECT 1 FROM processed_events WHERE group_name = ? "
                                   "AND event_id = ?", (group, event_id)).fetchone()
            if seen:
                self.db.execute("ROLLBACK")
                return False
            effect()
            self.db.execute("INSERT INTO processed_events VALUES (?, ?)", (group, event_id))
            self.db.execute("COMMIT")
            return True
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def record_effect(self, envelope: Envelope) -> None:
        self.db.execute("INSERT INTO effects VALUES (?)", (envelope.event_id,))

    def effects(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT event_id FROM effects")]


def _process_until(consumer: Consumer, handler: Callable[[Envelope], None],
                   done: Callable[[], bool], timeout_s: float = 10.0, **kwargs) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        consumer.process(handler, block_ms=50, **kwargs)


# Publishing and consuming ------------------------------------------------------------------------

def test_publish_then_consume_through_a_group(bus):
    with bus.connect("tolaria") as oona:
        sent = oona.publish_many([(Topic.SYSTEM_EVENTS_EPOCH, _epoch(n)) for n in range(3)])
        health_id = oona.publish(Topic.TELEMETRY_SEED_HEALTH, _health(step=7), trace_id="trace-7")
        consumer = oona.consumer("nissa", [Topic.SYSTEM_EVENTS_EPOCH, Topic.TELEMETRY_SEED_HEALTH],
                                 "nissa-1")
        deliveries = consumer.read(count=10, block_ms=1_000)
        by_topic = {t: [d for d in deliveries if d.topic is t] for t in Topic}

        assert [d.envelope.event_id for d in by_topic[Topic.SYSTEM_EVENTS_EPOCH]] == sent
        assert [d.envelope.message.epoch for d in by_topic[Topic.SYSTEM_EVENTS_EPOCH]] == [0, 1, 2]
        [health] = by_topic[Topic.TELEMETRY_SEED_HEALTH]
        assert (health.envelope.event_id, health.envelope.trace_id) == (health_id, "trace-7")
        assert health.envelope.message == _health(step=7)
        assert health.envelope.sender_id == "tolaria"
        assert {d.delivery_count for d in deliveries} == {1}
        assert oona.group_info(Topic.SYSTEM_EVENTS_EPOCH)[0].pending == 3

        for delivery in deliveries:
            consumer.ack(delivery)
        [info] = oona.group_info(Topic.SYSTEM_EVENTS_EPOCH)
        assert (info.name, info.pending, info.consumers) == ("nissa", 0, 1)
        assert consumer.read(count=10, block_ms=None) == []


def test_observers_read_without_consuming(bus):
    with bus.connect("tolaria") as oona:
        consumer = oona.consumer("tamiyo", [Topic.SYSTEM_EVENTS_EPOCH], "tamiyo-1")
        sent = oona.publish_many([(Topic.SYSTEM_EVENTS_EPOCH, _epoch(n)) for n in range(4)])
        tailed = oona.tail([Topic.SYSTEM_EVENTS_EPOCH], since="0")
        assert [e.envelope.event_id for e in tailed] == sent
        newest_two = oona.range(Topic.SYSTEM_EVENTS_EPOCH, count=2, reverse=True)
        assert [e.envelope.event_id for e in newest_two] == sent[:1:-1]
        # Nothing of that touched the group: all four are still there for Tamiyo.
        assert len(consumer.read(count=10, block_ms=None)) == 4

        # Tailing on from the last id seen waits for what arrives next.
        last_seen = tailed[-1].entry_id
        assert oona.tail([Topic.SYSTEM_EVENTS_EPOCH], since=last_seen) == []
        late = oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(9))
        [arrived] = oona.tail([Topic.SYSTEM_EVENTS_EPOCH],
                              since={Topic.SYSTEM_EVENTS_EPOCH: last_seen}, block_ms=1_000)
        assert arrived.envelope.event_id == late


def test_group_start_id_decides_what_it_gets_of_the_past(bus):
    with bus.connect("tolaria") as oona:
        before = oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(1))
        from_start = oona.consumer("karn", [Topic.SYSTEM_EVENTS_EPOCH], "karn-1")
        only_new = oona.consumer("watch", [Topic.SYSTEM_EVENTS_EPOCH], "watch-1", start_id="$")
        after = oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(2))
        assert [d.envelope.event_id for d in from_start.read(block_ms=None)] == [before, after]
        assert [d.envelope.event_id for d in only_new.read(block_ms=None)] == [after]
        # Joining an existing group again is harmless (BUSYGROUP is not an error).
        oona.consumer("karn", [Topic.SYSTEM_EVENTS_EPOCH], "karn-2")


DOOMED_CONSUMER = """
    import json, sys, time
    from pathlib import Path
    from esper.contracts import Topic
    from esper.oona import Oona
    from esper.workspace import Workspace

    root, url = sys.argv[1], sys.argv[2]
    oona = Oona.connect(Workspace(Path(root)) if root else None, url or None, sender_id="doomed")
    consumer = oona.consumer("tolaria", [Topic.CONTROL_RUN], "doomed", claim_idle_ms=200)
    [delivery] = consumer.read(count=1, block_ms=5_000)
    print(json.dumps({"entry_id": delivery.entry_id}), flush=True)
    time.sleep(60)  # killed here: read, never acknowledged
"""


def test_message_of_a_killed_consumer_is_reclaimed_by_another(bus):
    with bus.connect("operator") as oona:
        survivor = oona.consumer("tolaria", [Topic.CONTROL_RUN], "survivor", claim_idle_ms=200)
        event_id = oona.publish(Topic.CONTROL_RUN, _pause())
        doomed = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DOOMED_CONSUMER),
                                   *bus.argv()], stdout=subprocess.PIPE, text=True)
        try:
            read_by_doomed = json.loads(doomed.stdout.readline())["entry_id"]
        finally:
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.wait(timeout=10)
        assert survivor.read(block_ms=None) == []  # delivered once already: not "new"

        deadline = time.monotonic() + 10
        while not (reclaimed := survivor.reclaim()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [delivery] = reclaimed
        assert (delivery.entry_id, delivery.envelope.event_id) == (read_by_doomed, event_id)
        assert delivery.delivery_count == 2
        survivor.ack(delivery)
        assert oona.group_info(Topic.CONTROL_RUN)[0].pending == 0


def test_poison_message_is_dead_lettered_after_max_deliveries(bus):
    with bus.connect("tamiyo") as oona:
        consumer = oona.consumer("tolaria", [Topic.CONTROL_RUN], "tolaria-1", max_deliveries=3,
                                 claim_idle_ms=30)
        poison = oona.publish(Topic.CONTROL_RUN, _pause())
        attempts = []

        def failing_handler(envelope: Envelope) -> None:
            attempts.append(envelope.event_id)
            raise RuntimeError("cannot apply")

        _process_until(consumer, failing_handler, lambda: oona.dead_letters(Topic.CONTROL_RUN))
        assert attempts == [poison] * 3
        [letter] = oona.dead_letters(Topic.CONTROL_RUN)
        assert letter.reason == "not acknowledged after 3 deliveries"
        assert (letter.group, letter.consumer, letter.deliveries) == ("tolaria", "tolaria-1", 4)
        [original] = oona.range(Topic.CONTROL_RUN)
        assert letter.original_id == original.entry_id
        assert Envelope.from_json(letter.body["e"]).event_id == poison
        assert oona.group_info(Topic.CONTROL_RUN)[0].pending == 0


def test_unparseable_entries_are_dead_lettered_at_once(bus):
    with bus.connect("tamiyo") as oona:
        consumer = oona.consumer("tolaria", [Topic.CONTROL_RUN], "tolaria-1")
        key = Topic.CONTROL_RUN.stream_key
        garbage_id = oona.redis.xadd(key, {b"junk": b"\xff\x00not an envelope"}).decode()
        oona.redis.xadd(key, {b"e": b'{"topic": "control.run", "payload": {}}'})
        good = oona.publish(Topic.CONTROL_RUN, _pause())
        handled = []

        assert consumer.process(lambda env: handled.append(env.event_id), block_ms=None) == 1
        assert handled == [good]
        letters = oona.dead_letters(Topic.CONTROL_RUN)
        assert [letter.reason.split(":")[0] for letter in letters] == ["unparseable"] * 2
        assert letters[0].original_id == garbage_id
        assert letters[0].body == {"junk": b"\xff\x00not an envelope"}  # kept byte for byte
        assert "invalid Envelope: field 'sender_id': Field required" in letters[1].reason
        assert oona.group_info(Topic.CONTROL_RUN)[0].pending == 0
        assert oona.redis.xlen(dead_letter_key(Topic.CONTROL_RUN)) == 2


def test_redelivered_message_has_no_second_effect(bus, scratch):
    ledger = SqliteLedger(scratch / "ledger.db")
    with bus.connect("karn") as oona:
        first = oona.consumer("simic", [Topic.SYSTEM_EVENTS_EPOCH], "simic-1", claim_idle_ms=100)
        second = oona.consumer("simic", [Topic.SYSTEM_EVENTS_EPOCH], "simic-2", claim_idle_ms=100)
        event_id = oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(1))

        # simic-1 applies the effect durably, then dies before XACK.
        [delivery] = first.read(block_ms=1_000)
        assert ledger.run_once("simic", event_id, lambda: ledger.record_effect(delivery.envelope))

        # simic-2 reclaims it; the ledger knows the event: acknowledged, no second effect.
        time.sleep(0.15)
        assert second.process(ledger.record_effect, ledger=ledger, block_ms=None) == 1
        assert ledger.effects() == [event_id]
        assert oona.group_info(Topic.SYSTEM_EVENTS_EPOCH)[0].pending == 0

        # A producer's retry can publish the same envelope twice: still one effect.
        twice = oona.wrap(Topic.SYSTEM_EVENTS_EPOCH, _epoch(2))
        oona.publish_envelope(twice)
        oona.publish_envelope(twice)
        assert second.process(ledger.record_effect, ledger=ledger, block_ms=1_000) == 2
        assert ledger.effects() == [event_id, twice.event_id]
        assert oona.group_info(Topic.SYSTEM_EVENTS_EPOCH)[0].pending == 0


def test_handler_failure_leaves_the_message_for_a_retry(bus):
    with bus.connect("urabrask") as oona:
        consumer = oona.consumer("bench", [Topic.SYSTEM_EVENTS_EPOCH], "bench-1", claim_idle_ms=50)
        event_id = oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(1))
        calls = []

        def flaky(envelope: Envelope) -> None:
            calls.append(envelope.event_id)
            if len(calls) == 1:
                raise RuntimeError("transient")

        _process_until(consumer, flaky, lambda: len(calls) == 2)
        assert calls == [event_id, event_id]
        assert oona.group_info(Topic.SYSTEM_EVENTS_EPOCH)[0].pending == 0
        assert oona.dead_letters(Topic.SYSTEM_EVENTS_EPOCH) == []


# Telemetry retention -----------------------------------------------------------------------------

def test_trim_by_age_removes_old_telemetry_and_keeps_new(bus):
    with bus.connect("kasmina") as oona:
        key = Topic.TELEMETRY_SEED_HEALTH.stream_key
        old_ms = int(time.time() * 1000) - int(timedelta(hours=80).total_seconds() * 1000)
        for i in range(3):  # published 80 hours ago: ids carry the time of the XADD
            envelope = oona.wrap(Topic.TELEMETRY_SEED_HEALTH, _health(step=i))
            oona.redis.xadd(key, {b"e": envelope.to_json()}, id=f"{old_ms}-{i}")
        # A plain XADD: publish() would already trim the old entries on its own (next test).
        fresh = oona.wrap(Topic.TELEMETRY_SEED_HEALTH, _health(step=99))
        oona.redis.xadd(key, {b"e": fresh.to_json()})

        assert oona.trim_by_age(Topic.TELEMETRY_SEED_HEALTH) == 3  # default retention: 72 h
        assert [e.envelope for e in oona.range(Topic.TELEMETRY_SEED_HEALTH)] == [fresh]
        assert oona.trim_by_age(Topic.TELEMETRY_SEED_HEALTH, timedelta(hours=1)) == 0
        with pytest.raises(ValueError, match="no default retention"):
            oona.trim_by_age(Topic.CONTROL_RUN)


def test_publishing_telemetry_trims_old_entries_as_it_goes(bus):
    with bus.connect("kasmina") as oona:
        key = Topic.TELEMETRY_SEED_HEALTH.stream_key
        old_ms = int(time.time() * 1000) - int(timedelta(hours=100).total_seconds() * 1000)
        stale = oona.wrap(Topic.TELEMETRY_SEED_HEALTH, _health(step=0, seeds=1)).to_json()
        pipe = oona.redis.pipeline()
        for i in range(250):
            pipe.xadd(key, {b"e": stale}, id=f"{old_ms}-{i}")
        pipe.execute()
        fresh = oona.publish(Topic.TELEMETRY_SEED_HEALTH, _health(step=1))
        # "~" trimming drops whole stream nodes (100 entries each): the two full old ones go,
        # the node the new entry shares with old ones stays until trim_by_age.
        assert oona.redis.xlen(key) < 251
        assert oona.range(Topic.TELEMETRY_SEED_HEALTH, reverse=True, count=1)[0].envelope.event_id \
            == fresh


# Connection failures -----------------------------------------------------------------------------

def test_wrong_or_missing_password_is_bad_input(external):
    wrong = external.url.replace(PASSWORD, "not-the-password")
    with pytest.raises(BadInputError, match="refused the credentials") as caught:
        Oona.connect(None, wrong, sender_id="test")
    assert "not-the-password" not in str(caught.value)
    with pytest.raises(BadInputError, match="refused the credentials"):
        Oona.connect(None, f"redis://127.0.0.1:{external.port}", sender_id="test")


def test_unreachable_server_is_bus_unavailable():
    url = f"redis://:{PASSWORD}@127.0.0.1:{_free_port()}/0"
    started = time.monotonic()
    with pytest.raises(BusUnavailableError) as caught:
        Oona.connect(None, url, sender_id="test")
    message = str(caught.value)
    assert message.startswith("Redis at redis://:***@127.0.0.1:")
    assert "is unreachable" in message
    assert PASSWORD not in message and "\n" not in message
    assert caught.value.exit_code == 1
    assert time.monotonic() - started < 3


def test_losing_an_external_server_is_bus_unavailable(external):
    with Oona.connect(None, external.url, sender_id="test") as oona:
        external.stop()
        with pytest.raises(BusUnavailableError, match=r"127\.0\.0\.1"):
            oona.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(1))


# Training goes on --------------------------------------------------------------------------------

def test_buffered_publisher_rides_out_an_outage_and_drops_the_oldest(scratch):
    server = ExternalRedis(scratch).start()
    try:
        connect = lambda: Oona.connect(None, server.url, sender_id="tolaria")
        with BufferedPublisher(connect, sender_id="tolaria", max_buffered=3,
                               retry_min_s=0.0) as publisher:
            publisher.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(0))
            assert (publisher.connected, publisher.buffered) == (True, 0)

            server.stop()
            for n in range(1, 6):  # the training loop goes on: nothing raises
                publisher.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(n))
            assert (publisher.connected, publisher.buffered, publisher.dropped) == (False, 3, 2)

            server.start()  # same port; a fresh server that lost everything
            assert publisher.flush()
            publisher.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(6))
            with connect() as oona:
                epochs = [e.envelope.message.epoch for e in oona.range(Topic.SYSTEM_EVENTS_EPOCH)]
        assert epochs == [3, 4, 5, 6]  # the three newest of the outage, in order, then new ones
    finally:
        server.stop()


def test_buffered_publisher_started_during_an_outage(scratch):
    server = ExternalRedis(scratch)  # not started yet
    connect = lambda: Oona.connect(None, server.url, sender_id="tolaria")
    publisher = BufferedPublisher(connect, sender_id="tolaria", retry_min_s=60.0)
    try:
        assert not publisher.connected
        started = time.monotonic()
        for n in range(100):
            publisher.publish(Topic.TELEMETRY_SEED_HEALTH, _health(step=n))
        assert time.monotonic() - started < 1.0  # the back-off spares each step a connect attempt
        assert publisher.buffered == 100

        server.start()
        assert publisher.flush()  # flush tries at once, whatever the back-off
        with connect() as oona:
            steps = [e.envelope.message.step for e in oona.range(Topic.TELEMETRY_SEED_HEALTH)]
        assert steps == list(range(100))
    finally:
        publisher.close()
        server.stop()


def test_training_publisher_survives_the_embedded_server_being_killed(workspace):
    connect = lambda: Oona.connect(workspace, sender_id="tolaria")
    with BufferedPublisher(connect, sender_id="tolaria") as publisher:
        for n in range(3):
            publisher.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(n))
        pid = read_pid(workspace)
        os.kill(pid, signal.SIGKILL)
        for n in range(3, 6):
            publisher.publish(Topic.SYSTEM_EVENTS_EPOCH, _epoch(n))
        assert publisher.flush() and publisher.dropped == 0
    with connect() as oona:
        epochs = [e.envelope.message.epoch for e in oona.range(Topic.SYSTEM_EVENTS_EPOCH)]
    assert epochs == list(range(6))  # the AOF kept the first three; the restart took the rest
    assert read_pid(workspace) != pid
