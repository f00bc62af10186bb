"""The dashboard samples the telemetry firehose: only the newest HealthSignals cross the wire and
get parsed, and the seeds it shows still come out right (transitions are read in full, and a
sampled signal older than a transition does not turn a seed back)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from esper.contracts import HealthSignal, SeedTransition, Topic
from esper.contracts import SeedLifecycle as S
from esper.nissa import Watcher
from esper.nissa.reader import SAMPLE_COUNT
from esper.oona import Oona, stop_embedded
from esper.workspace import Workspace


def health(layer: int, stages: list[S], step: int) -> HealthSignal:
    n = len(stages)
    return HealthSignal(run_id="r", layer_id=layer, layer_name=f"layers.{layer}", epoch=1,
                        step=step, lifecycle=stages, activation_mean=[0.0] * n,
                        activation_variance=[1.0] * n, dead_ratio=[0.0] * n,
                        gradient_energy=[0.1] * n, is_ready_for_transition=[False] * n)


def transition(a: S, b: S) -> SeedTransition:
    return SeedTransition(run_id="r", seed_id="1:0", epoch=1, from_stage=a, to_stage=b)


def test_sampled_telemetry_reads_the_newest_signals_and_keeps_transitions_exact():
    root = Path(tempfile.mkdtemp(prefix="ns", dir="/tmp"))
    ws = Workspace(root / "ws")
    ws.create()
    try:
        with Oona.connect(ws, sender_id="tolaria") as bus:
            # Many reports of two layers; layer 1's seed 0 germinates halfway.
            bus.publish_many([(Topic.TELEMETRY_SEED_HEALTH, health(layer, [S.DORMANT] * 4, step))
                              for step in range(300) for layer in (1, 2)])
            bus.publish(Topic.LIFECYCLE_SEED_TRANSITIONS, transition(S.DORMANT, S.GERMINATED))
            bus.publish_many([(Topic.TELEMETRY_SEED_HEALTH,
                               health(layer, [S.GERMINATED if layer == 1 else S.DORMANT]
                                      + [S.DORMANT] * 3, step))
                              for step in range(300, 600) for layer in (1, 2)])
            sampled = Watcher(ws, None, since_ms=0, sample_telemetry=True, publish_alerts=False)
            exact = Watcher(ws, None, since_ms=0, publish_alerts=False)
            try:
                sampled.start()
                exact.start()
                assert sampled.state.events[Topic.TELEMETRY_SEED_HEALTH] == SAMPLE_COUNT
                assert exact.state.events[Topic.TELEMETRY_SEED_HEALTH] == 1200
                assert sampled.state.events[Topic.LIFECYCLE_SEED_TRANSITIONS] == 1
                for watcher in (sampled, exact):
                    run = watcher.state.runs["r"]
                    assert run.seeds_by_layer() == {1: {S.GERMINATED: 1, S.DORMANT: 3},
                                                    2: {S.DORMANT: 4}}
                    assert run.layer_names == {1: "layers.1", 2: "layers.2"}

                # Seed 1:0 moves on; a burst of older-looking signals is not published after
                # it, so the newest sample agrees; the transition is what moves the stage.
                bus.publish_many([(Topic.LIFECYCLE_SEED_TRANSITIONS, transition(a, b))
                                  for a, b in ((S.GERMINATED, S.LOADING),
                                               (S.LOADING, S.TRAINING))])
                sampled.tick()
                assert sampled.state.runs["r"].seeds["1:0"] is S.TRAINING
                assert sampled.state.events[Topic.LIFECYCLE_SEED_TRANSITIONS] == 3

                # A signal stamped before the transitions, read after them, changes nothing.
                stale = bus.wrap(Topic.TELEMETRY_SEED_HEALTH,
                                 health(1, [S.GERMINATED] + [S.DORMANT] * 3, 599))
                stale = stale.model_copy(update={"timestamp": stale.timestamp.replace(year=2000)})
                bus.publish_envelope(stale)
                bus.publish(Topic.TELEMETRY_SEED_HEALTH,
                            health(2, [S.GERMINATED] + [S.DORMANT] * 3, 600))
                events = sampled.tick()
                assert [e.topic for e in events] == [Topic.TELEMETRY_SEED_HEALTH] * 2
                assert sampled.state.runs["r"].seeds_by_layer() == {
                    1: {S.TRAINING: 1, S.DORMANT: 3}, 2: {S.GERMINATED: 1, S.DORMANT: 3}}
                assert sampled.tick() == []  # nothing new: nothing read twice
            finally:
                sampled.close()
                exact.close()
    finally:
        stop_embedded(ws)
        shutil.rmtree(root, ignore_errors=True)
