"""What the watcher knows, built from envelopes as they arrive and from Urza's counts.

`WatchState.apply(envelope)` is the only way events get in, so a backlog read at start, a live
tail and a test publishing events by hand all produce the same state.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from esper.contracts import (
    TERMINAL_STAGES,
    CompilationFailed,
    DaemonHeartbeat,
    Envelope,
    EpochEvent,
    FieldReport,
    HealthSignal,
    KernelCharacterized,
    KernelReady,
    RunControl,
    RunControlAction,
    SeedLifecycle,
    SeedTransition,
    TamiyoDecision,
    Topic,
)
from esper.oona import GroupInfo

# How much history the dashboard keeps per run and overall.
DECISIONS_KEPT = 5
# A seed's whole path (DORMANT to FOSSILIZED) is 8 transitions; the dashboard lists them all,
# even those between two redraws, where its stage counts show only what each redraw found.
TRANSITIONS_KEPT = 10
FIELD_REPORTS_KEPT = 8
# Forge and bench throughput: results in this trailing window, per minute.
THROUGHPUT_WINDOW_S = 600.0
# A training run beats on system.heartbeats as this daemon, its run id as the worker; its last
# beat, as its process ends (completed, stopped, diverged, interrupted or failed), is "stopping".
RUN_DAEMON = "tolaria"
# How a run says it ended in its summary.json ("status").
RUN_OUTCOMES = frozenset({"completed", "stopped", "diverged"})


@dataclass
class RunView:
    run_id: str
    epoch: int | None = None
    planned_epochs: int | None = None  # from its EpochEvents, else its config in Urza
    planned_by_events: bool = False  # its EpochEvents said planned_epochs
    global_step: int = 0
    train_loss: float | None = None
    validation_loss: float | None = None
    validation_accuracy: float | None = None
    learning_rate: float | None = None
    active_seeds: int = 0
    fossilized_seeds: int = 0
    last_epoch_at: float | None = None  # unix time of the last EpochEvent
    first_seen_at: float = 0.0
    stopped_at: float | None = None  # when a control.run STOP was issued to it
    ended_at: float | None = None  # its process's last heartbeat said "stopping"
    outcome: str | None = None  # how it ended, as its summary.json says (RUN_OUTCOMES)
    seeds: dict[str, SeedLifecycle] = field(default_factory=dict)  # "layer:index" -> stage
    # When each seed's stage was said (the event's timestamp): a sampled HealthSignal read after
    # a newer transition does not turn the seed back.
    seed_at: dict[str, float] = field(default_factory=dict)
    layer_names: dict[int, str] = field(default_factory=dict)
    decisions: deque[TamiyoDecision] = field(default_factory=lambda: deque(maxlen=DECISIONS_KEPT))
    # The newest last, in the order the events were applied.
    transitions: deque[SeedTransition] = field(
        default_factory=lambda: deque(maxlen=TRANSITIONS_KEPT))
    outcomes: Counter[SeedLifecycle] = field(default_factory=Counter)  # terminal transitions

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    @property
    def finished(self) -> bool:
        return self.stopped or self.ended_at is not None or self._last_epoch_done

    @property
    def status(self) -> str:
        """"running", or how the run ended: what its summary.json says (completed, stopped,
        diverged) when the watcher could read it, else what the bus says: "stopped" (a STOP was
        issued), "completed" (its last planned epoch), "ended" (its process said it was stopping
        and nothing says why: interrupted, failed, or a summary this watcher cannot read)."""
        if self.outcome is not None:
            return self.outcome
        if self.stopped:
            return "stopped"
        if self._last_epoch_done:
            return "completed"
        return "ended" if self.ended_at is not None else "running"

    @property
    def _last_epoch_done(self) -> bool:
        return (self.planned_epochs is not None and self.epoch is not None
                and self.epoch >= self.planned_epochs)

    def beat(self, state: str, at: float, new_process: bool = False) -> None:
        """Its process's heartbeat: "stopping" ends the run; a later one of another state (a
        --resume of it) starts it again, as does one from another process than the last beat's
        (`new_process`: the run was killed before it could say it was stopping)."""
        if state == "stopping":
            if self.ended_at is None or at >= self.ended_at:
                self.ended_at = at
        else:
            self.restarted(at, new_process)

    def restarted(self, at: float, new_process: bool = False) -> None:
        """Something the run sent at `at`: after the end it knew of, or from a new process, the
        run goes on (resumed), and a STOP issued before `at` is done with. Not after the STOP
        alone: a run stops at its next step or epoch end, so an epoch event or a beat of the same
        process may follow the STOP before it ends."""
        if new_process or (self.ended_at is not None and at > self.ended_at):
            self.ended_at = self.outcome = None
            if self.stopped_at is not None and at > self.stopped_at:
                self.stopped_at = None
            # The plan was the last session's (a completed run resumed with --epochs plans
            # more): unknown, not the registered config's, until its next epoch event says.
            self.planned_epochs, self.planned_by_events = None, True

    def plan_from_config(self, epochs: int) -> None:
        """The epochs the run's config in Urza plans: only a fallback, for a run whose epoch
        events do not say. That config is the one the run registered as it began; a resume's
        --epochs is in its events."""
        if not self.planned_by_events:
            self.planned_epochs = epochs

    def set_seed(self, seed: str, stage: SeedLifecycle, at: float) -> None:
        """The seed is at `stage` as of `at`, unless something newer was already said."""
        if at >= self.seed_at.get(seed, at):
            self.seeds[seed] = stage
            self.seed_at[seed] = at

    def seeds_by_layer(self) -> dict[int, Counter[SeedLifecycle]]:
        """Seed counts by stage, per layer id."""
        layers: dict[int, Counter[SeedLifecycle]] = defaultdict(Counter)
        for seed, stage in self.seeds.items():
            layers[int(seed.split(":", 1)[0])][stage] += 1
        return dict(sorted(layers.items()))


@dataclass
class DaemonView:
    daemon: str
    worker_id: str
    state: str
    last_beat_at: float  # unix time (the sender's clock)
    interval_s: float
    published: dict[str, int]
    beats: int = 0
    host: str = ""
    pid: int = 0
    uptime_s: float = 0.0

    def other_process(self, beat: DaemonHeartbeat) -> bool:
        """`beat` comes from another process than this last one: another host or pid, or the
        same pid with less uptime (pids are reused: a container gives its process the same one
        each time). A "stopping" beat may come a few ms of uptime behind the beat published
        before it (it is queued as the process closes): RunView.beat does not ask of one."""
        return (beat.host, beat.pid) != (self.host, self.pid) or beat.uptime_s < self.uptime_s


@dataclass
class WatchState:
    runs: dict[str, RunView] = field(default_factory=dict)
    daemons: dict[tuple[str, str], DaemonView] = field(default_factory=dict)
    field_reports: deque[FieldReport] = field(
        default_factory=lambda: deque(maxlen=FIELD_REPORTS_KEPT))
    events: Counter[Topic] = field(default_factory=Counter)
    # Timestamps (unix) of forge and bench results, for throughput.
    kernels_ready: deque[float] = field(default_factory=deque)
    kernels_judged: deque[float] = field(default_factory=deque)
    compilation_failures: int = 0
    judged: Counter[str] = field(default_factory=Counter)  # VALIDATED / REJECTED seen on the bus
    # From Urza and XINFO, refreshed by the watcher.
    catalog: dict[str, Any] = field(default_factory=dict)
    groups: dict[Topic, list[GroupInfo]] = field(default_factory=dict)
    stream_lengths: dict[Topic, int] = field(default_factory=dict)
    bus_error: str | None = None
    run_filter: str | None = None

    # Events -------------------------------------------------------------------------------------
    def accepts(self, envelope: Envelope) -> bool:
        """False for events of another run than `run_filter`."""
        run_id = getattr(envelope.payload, "run_id", None)
        return self.run_filter is None or run_id is None or run_id == self.run_filter

    def apply(self, envelope: Envelope) -> bool:
        """Fold one event in; returns False (and changes nothing) when it is filtered out."""
        if not self.accepts(envelope):
            return False
        self.events[envelope.topic] += 1
        at = envelope.timestamp.timestamp()
        message = envelope.payload
        if isinstance(message, EpochEvent):
            run = self._run(message.run_id, at)
            run.restarted(at)
            run.epoch, run.global_step = message.epoch, message.global_step
            run.train_loss, run.validation_loss = message.train_loss, message.validation_loss
            run.validation_accuracy, run.learning_rate = (message.validation_accuracy,
                                                          message.learning_rate)
            run.active_seeds, run.fossilized_seeds = message.active_seeds, message.fossilized_seeds
            run.last_epoch_at = at
            if message.epochs_planned is not None:
                run.planned_epochs, run.planned_by_events = message.epochs_planned, True
        elif isinstance(message, HealthSignal):
            run = self._run(message.run_id, at)
            run.layer_names[message.layer_id] = message.layer_name
            for index, stage in enumerate(message.lifecycle):
                run.set_seed(f"{message.layer_id}:{index}", stage, at)
        elif isinstance(message, SeedTransition):
            run = self._run(message.run_id, at)
            run.set_seed(message.seed_id, message.to_stage, at)
            run.transitions.append(message)
            if message.to_stage in TERMINAL_STAGES:
                run.outcomes[message.to_stage] += 1
        elif isinstance(message, TamiyoDecision):
            self._run(message.run_id, at).decisions.append(message)
        elif isinstance(message, RunControl):
            if message.action is RunControlAction.STOP:
                self._run(message.run_id, at).stopped_at = at
        elif isinstance(message, FieldReport):
            self.field_reports.append(message)
        elif isinstance(message, KernelReady):
            self.kernels_ready.append(at)
        elif isinstance(message, CompilationFailed):
            self.compilation_failures += 1
        elif isinstance(message, KernelCharacterized):
            self.kernels_judged.append(at)
            self.judged[message.status] += 1
        elif isinstance(message, DaemonHeartbeat):
            key = (message.daemon, message.worker_id)
            last = self.daemons.get(key)
            self.daemons[key] = DaemonView(daemon=message.daemon, worker_id=message.worker_id,
                                           state=message.state, last_beat_at=at,
                                           interval_s=message.interval_s,
                                           published=dict(message.published),
                                           beats=last.beats + 1 if last is not None else 1,
                                           host=message.host, pid=message.pid,
                                           uptime_s=message.uptime_s)
            run = self.runs.get(message.worker_id) if message.daemon == RUN_DAEMON else None
            if run is not None:
                run.beat(message.state, at, last is not None and last.other_process(message))
        return True

    def _run(self, run_id: str, at: float) -> RunView:
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = RunView(run_id=run_id, first_seen_at=at)
        return run

    # Derived ------------------------------------------------------------------------------------
    def throughput_per_min(self, stamps: deque[float], now: float | None = None) -> float:
        """Results per minute over the trailing window (older stamps are dropped)."""
        now = time.time() if now is None else now
        while stamps and stamps[0] < now - THROUGHPUT_WINDOW_S:
            stamps.popleft()
        return len(stamps) * 60.0 / THROUGHPUT_WINDOW_S

    def catalog_counts(self, table: str) -> dict[str, int]:
        counts = self.catalog.get(table)
        return dict(counts) if isinstance(counts, dict) else {}
