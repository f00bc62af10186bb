"""The watcher's pure parts: --since, alert-rule files, the state's folds, plain lines."""

from __future__ import annotations

import io
import itertools

import pytest

from esper.contracts import Envelope, EpochEvent, SeedTransition, Topic
from esper.contracts import SeedLifecycle as S
from esper.errors import BadInputError
from esper.nissa import AlertRules, WatchState, evaluate, parse_since
from esper.nissa.dashboard import plain_line
from esper.nissa.state import TRANSITIONS_KEPT


def test_parse_since():
    now = 1_000_000.0
    assert parse_since("90s", now=now) == (now - 90) * 1000
    assert parse_since("15m", now=now) == (now - 900) * 1000
    assert parse_since("2h", now=now) == (now - 7200) * 1000
    assert parse_since("all") == 0
    assert parse_since("1970-01-01T00:00:10") == 10_000
    with pytest.raises(BadInputError, match="--since 'soon'"):
        parse_since("soon")


def test_rules_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("consumer_lag_max: 5\nrollback_rate_max: 0.1\n")
    rules = AlertRules.load(path)
    assert rules.consumer_lag_max == 5 and rules.epoch_stale_s == AlertRules().epoch_stale_s
    path.write_text("rollback_rate_max: 2\n")
    with pytest.raises(BadInputError, match="rollback_rate_max"):
        AlertRules.load(path)


def wrap(topic, message):
    return Envelope.wrap(topic, message, sender_id="tolaria")


def test_state_folds_seeds_by_layer_and_filters_runs():
    state = WatchState(run_filter="a")
    assert state.apply(wrap(Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(
        run_id="a", epoch=1, global_step=7, train_loss=0.5, validation_loss=0.6)))
    assert not state.apply(wrap(Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(
        run_id="b", epoch=1, global_step=7, train_loss=0.5, validation_loss=0.6)))
    for seed in ("0:0", "2:1"):
        state.apply(wrap(Topic.LIFECYCLE_SEED_TRANSITIONS, SeedTransition(
            run_id="a", seed_id=seed, epoch=1, from_stage=S.DORMANT, to_stage=S.GERMINATED)))
    assert {layer: dict(c) for layer, c in state.runs["a"].seeds_by_layer().items()} == \
        {0: {S.GERMINATED: 1}, 2: {S.GERMINATED: 1}}
    assert list(state.runs) == ["a"]
    # A run that has been silent past the threshold is stalled, unless it finished.
    rules = AlertRules(epoch_stale_s=10)
    later = state.runs["a"].last_epoch_at + 11
    assert [a.rule for a in evaluate(state, rules, now=later)] == ["run_stalled"]
    state.runs["a"].planned_epochs = 1
    assert evaluate(state, rules, now=later) == []
    # The trainer's EpochEvents say when the run ends: no catalog needed to know it finished.
    other = WatchState()
    other.apply(wrap(Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(
        run_id="c", epoch=2, global_step=9, train_loss=0.5, validation_loss=0.6,
        epochs_planned=2)))
    assert other.runs["c"].finished


def test_a_run_whose_process_said_it_was_stopping_has_ended_until_it_resumes():
    from datetime import UTC, datetime

    from esper.contracts import DaemonHeartbeat

    def at(seconds, topic, message):
        envelope = wrap(topic, message)
        return envelope.model_copy(update={"timestamp": datetime.fromtimestamp(seconds, UTC)})

    def beat(seconds, state):
        return at(seconds, Topic.SYSTEM_HEARTBEATS, DaemonHeartbeat(
            daemon="tolaria", worker_id="d", state=state, interval_s=10))

    state = WatchState()
    state.apply(at(100, Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(
        run_id="d", epoch=2, global_step=9, train_loss=0.5, validation_loss=0.6,
        epochs_planned=4)))
    run = state.runs["d"]
    assert not run.finished and run.status == "running"
    state.apply(beat(101, "stopping"))  # diverged, interrupted or failed: it ended short
    rules = AlertRules(epoch_stale_s=10)
    assert run.finished and run.status == "ended" and evaluate(state, rules, now=200) == []
    run.outcome = "diverged"  # what the watcher reads in its summary.json
    assert run.status == "diverged"
    state.apply(beat(150, "busy"))  # --resume
    assert not run.finished and run.outcome is None
    assert [a.rule for a in evaluate(state, rules, now=200)] == ["run_stalled"]
    # Another daemon's worker of the same name is not the run.
    state.apply(at(160, Topic.SYSTEM_HEARTBEATS, DaemonHeartbeat(
        daemon="tezzeret", worker_id="d", state="stopping", interval_s=10)))
    assert not run.finished


def at(seconds, topic, message):
    """`message` as the bus would carry it, sent at unix time `seconds`."""
    from datetime import UTC, datetime

    envelope = wrap(topic, message)
    return envelope.model_copy(update={"timestamp": datetime.fromtimestamp(seconds, UTC)})


def epoch_event(seconds, run_id, epoch, planned=None):
    return at(seconds, Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(
        run_id=run_id, epoch=epoch, global_step=7 * epoch, train_loss=0.5, validation_loss=0.6,
        epochs_planned=planned))


def test_a_run_epoch_events_plan_its_epochs_over_its_registered_config():
    """A run created with 3 epochs (so registered in Urza) and resumed with --epochs 12: its
    epoch events say 12. Before, the watcher's catalog read replaced that with the registered 3,
    and the run, dead or alive at epoch 4, showed "completed"."""
    state = WatchState()
    state.apply(epoch_event(100, "r", 4, planned=12))
    run = state.runs["r"]
    run.plan_from_config(3)  # what the watcher reads from the config the run registered
    assert run.planned_epochs == 12 and not run.finished and run.status == "running"
    # The registered config is the fallback for events that do not say (an older Tolaria's)...
    older = WatchState()
    older.apply(epoch_event(100, "o", 3))
    older.runs["o"].plan_from_config(3)
    assert older.runs["o"].planned_epochs == 3 and older.runs["o"].status == "completed"
    # ...until one does: read before the run's events, it gives way to them.
    older.apply(epoch_event(101, "o", 4, planned=12))
    assert older.runs["o"].planned_epochs == 12 and older.runs["o"].status == "running"
    older.runs["o"].plan_from_config(3)
    assert older.runs["o"].planned_epochs == 12


def test_a_stopped_run_is_stopped_until_it_goes_on_after_its_end():
    """Before, a STOP stuck to the run: stopped, then resumed, it showed "stopped" for ever."""
    from esper.contracts import DaemonHeartbeat, RunControl, RunControlAction

    def beat(seconds, state):
        return at(seconds, Topic.SYSTEM_HEARTBEATS, DaemonHeartbeat(
            daemon="tolaria", worker_id="s", state=state, interval_s=10))

    def stop(seconds):
        return at(seconds, Topic.CONTROL_RUN, RunControl(run_id="s", action=RunControlAction.STOP))

    state = WatchState()
    state.apply(epoch_event(100, "s", 2, planned=12))
    state.apply(stop(101))
    run = state.runs["s"]
    assert run.finished and run.status == "stopped"
    # A STOP read during an epoch's evaluation: the run ends that epoch, beats, then stops.
    for envelope in (epoch_event(102, "s", 3, planned=12), beat(103, "busy"),
                     beat(104, "stopping")):
        state.apply(envelope)
        assert run.finished and run.status == "stopped"
    state.apply(beat(150, "busy"))  # --resume
    assert not run.finished and run.status == "running"
    state.apply(epoch_event(160, "s", 4, planned=12))
    assert run.status == "running"
    # Stopped again in the resumed session, it is stopped again.
    state.apply(stop(170))
    assert run.finished and run.status == "stopped"
    # A STOP sent to a run that had already ended does not outlive its resume either.
    dead = WatchState()
    for envelope in (epoch_event(100, "s", 2, planned=12), beat(101, "stopping"), stop(120)):
        dead.apply(envelope)
    assert dead.runs["s"].status == "stopped"
    dead.apply(beat(150, "busy"))
    assert dead.runs["s"].status == "running"


def test_a_stopped_run_killed_before_it_ended_is_running_once_another_process_beats():
    """A STOP, then the run is killed before it ends: no "stopping" beat. Before, the resumed
    run showed "stopped" for ever; now a beat from another process (another pid, or the same pid
    with less uptime: a container gives its process the same pid each time) ends the STOP."""
    from esper.contracts import DaemonHeartbeat, RunControl, RunControlAction

    def beat(seconds, pid, uptime, state="busy"):
        return at(seconds, Topic.SYSTEM_HEARTBEATS, DaemonHeartbeat(
            daemon="tolaria", worker_id="k", pid=pid, uptime_s=uptime, state=state,
            interval_s=10))

    def stop(seconds):
        return at(seconds, Topic.CONTROL_RUN, RunControl(run_id="k", action=RunControlAction.STOP))

    state = WatchState()
    for envelope in (beat(90, 7, 1.0), epoch_event(100, "k", 2, planned=12), beat(100, 7, 11.0),
                     stop(101)):
        state.apply(envelope)
    run = state.runs["k"]
    # The same process goes on to its next step or epoch end before it stops: still stopped.
    for envelope in (beat(110, 7, 21.0), epoch_event(111, "k", 3, planned=12),
                     beat(120, 7, 31.0)):
        state.apply(envelope)
        assert run.finished and run.status == "stopped"
    # Killed there; esper train --resume k is another process.
    state.apply(beat(150, 8, 0.5))
    assert not run.finished and run.status == "running"
    assert run.planned_epochs is None  # the killed session's plan, until an epoch event says
    state.apply(epoch_event(160, "k", 4, planned=12))
    assert (run.status, run.planned_epochs) == ("running", 12)
    # Stopped and killed again, resumed in a container: the same pid, its uptime starts over.
    for envelope in (stop(170), beat(171, 8, 21.5)):
        state.apply(envelope)
        assert run.status == "stopped"
    state.apply(beat(200, 8, 0.4))
    assert not run.finished and run.status == "running"
    # The "stopping" beat of a process that does stop is queued as it closes, so it may carry a
    # few ms less uptime than the beat published just before it: it is no new process.
    for envelope in (stop(210), beat(211, 8, 11.402), beat(212, 8, 11.4, "stopping")):
        state.apply(envelope)
        assert run.finished and run.status == "stopped"


def test_plain_line_is_one_line():
    line = plain_line(wrap(Topic.LIFECYCLE_SEED_TRANSITIONS, SeedTransition(
        run_id="a", seed_id="0:0", epoch=1, from_stage=S.DORMANT, to_stage=S.GERMINATED,
        reason="plateau")))
    assert line.endswith("lifecycle.seed.transitions tolaria: run a seed 0:0 DORMANT -> "
                         "GERMINATED (plateau)")
    assert "\n" not in line


def seed_path(run_id: str, seed: str, stages: list[S], epoch: int = 1) -> list[Envelope]:
    """The SeedTransition events that move `seed` of `run_id` along `stages`, one per step."""
    return [wrap(Topic.LIFECYCLE_SEED_TRANSITIONS, SeedTransition(
        run_id=run_id, seed_id=seed, epoch=epoch + i, from_stage=a, to_stage=b,
        reason=f"step {i}")) for i, (a, b) in enumerate(itertools.pairwise(stages))]


def test_state_keeps_each_run_recent_transitions_in_event_order():
    growth = [S.DORMANT, S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION,
              S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    state = WatchState(run_filter="a")
    # Two seeds of run "a" interleaved, 8 + 4 = 12 transitions; run "b" filtered out.
    first, second = seed_path("a", "0:0", growth), seed_path("a", "1:2", growth[:5])
    events = [e for pair in itertools.zip_longest(first, second) for e in pair if e is not None]
    for envelope in events + seed_path("b", "0:0", growth[:3]):
        state.apply(envelope)
    assert list(state.runs) == ["a"]
    kept = [(t.seed_id, t.from_stage, t.to_stage) for t in state.runs["a"].transitions]
    everything = [(e.payload.seed_id, e.payload.from_stage, e.payload.to_stage) for e in events]
    assert len(everything) > TRANSITIONS_KEPT and kept == everything[-TRANSITIONS_KEPT:]
    # Per run: another run's transitions are kept apart from "a"'s.
    both = WatchState()
    for envelope in seed_path("a", "0:0", growth[:3]) + seed_path("b", "0:0", growth[:4]):
        both.apply(envelope)
    assert [t.to_stage for t in both.runs["a"].transitions] == [S.GERMINATED, S.LOADING]
    assert [t.to_stage for t in both.runs["b"].transitions] == [S.GERMINATED, S.LOADING,
                                                                  S.TRAINING]


def test_dashboard_lists_every_recent_transition_newest_last():
    from rich.console import Console

    from esper.nissa.dashboard import render_dashboard

    state = WatchState()
    for envelope in seed_path("a", "1:0", [S.DORMANT, S.GERMINATED, S.LOADING, S.TRAINING]):
        state.apply(envelope)
    state.apply(wrap(Topic.LIFECYCLE_SEED_TRANSITIONS, SeedTransition(
        run_id="b", seed_id="0:3", epoch=4, from_stage=S.DORMANT, to_stage=S.GERMINATED)))
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render_dashboard(state, [], now=0.0))
    screen = console.export_text()
    panel = screen[screen.index("seed transitions"):].splitlines()[1:]
    rows = [[cell.strip() for cell in line.strip(" │").split("│")] for line in panel
            if "->" in line]
    assert rows == [["a", "1", "1:0", "DORMANT -> GERMINATED", "step 0"],
                    ["a", "2", "1:0", "GERMINATED -> LOADING", "step 1"],
                    ["a", "3", "1:0", "LOADING -> TRAINING", "step 2"],
                    ["b", "4", "0:3", "DORMANT -> GERMINATED", "-"]]


def test_a_completed_run_resumed_for_more_epochs_is_running_before_its_next_epoch():
    """Its last epoch event said 3 of 3: once its resumed process beats, that plan is the old
    session's, and the run is running (not "completed") until an epoch event says the new one."""
    from esper.contracts import DaemonHeartbeat

    def beat(seconds, state):
        return at(seconds, Topic.SYSTEM_HEARTBEATS, DaemonHeartbeat(
            daemon="tolaria", worker_id="r", state=state, interval_s=10))

    state = WatchState()
    state.apply(epoch_event(100, "r", 3, planned=3))
    state.apply(beat(101, "stopping"))
    run = state.runs["r"]
    assert run.status == "completed"
    state.apply(beat(150, "busy"))  # esper train --resume r --epochs 12
    run.plan_from_config(3)  # the watcher's catalog refresh: the config the run began with
    assert run.status == "running" and not run.finished
    state.apply(epoch_event(160, "r", 4, planned=12))
    assert (run.status, run.planned_epochs) == ("running", 12)
