"""Prometheus exposition of what the watcher sees (`esper watch --metrics-port`).

Counters grow with the events read since the watcher started (the backlog included); gauges are
set from the state at each refresh; histograms observe per-event numbers. The registry is the
watcher's own, so several watchers in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from esper.contracts import (
    CompilationFailed,
    DaemonHeartbeat,
    Envelope,
    EpochEvent,
    FieldReport,
    KernelCharacterized,
    KernelReady,
    SeedTransition,
    TamiyoDecision,
)
from esper.errors import BadInputError
from esper.nissa.alerts import Alert
from esper.nissa.state import WatchState


class WatchMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._server = None
        # Counters: events as they are read.
        self.events = Counter("esper_bus_events", "Bus events read by the watcher (the dashboard samples "
                              "telemetry.seed.health: of that topic, the entries it read).", ["topic"],
                              registry=r)
        self.transitions = Counter("esper_seed_transitions", "Seed lifecycle transitions.",
                                   ["run", "to_stage"], registry=r)
        self.decisions = Counter("esper_tamiyo_decisions", "Tamiyo decisions.",
                                 ["run", "action"], registry=r)
        self.field_reports = Counter("esper_field_reports", "Adaptation outcomes (field reports).",
                                     ["outcome"], registry=r)
        self.kernels_ready = Counter("esper_forge_kernels_ready", "Kernels compiled by the forge.",
                                     ["pipeline", "target"], registry=r)
        self.compilation_failures = Counter("esper_forge_compilation_failures",
                                            "Blueprints or jobs the forge could not compile.",
                                            ["stage"], registry=r)
        self.kernels_judged = Counter("esper_bench_kernels_judged",
                                      "Kernels judged by the bench.", ["status"], registry=r)
        self.heartbeats = Counter("esper_daemon_heartbeats", "Daemon heartbeats.",
                                  ["daemon", "worker"], registry=r)
        # Histograms: per-event numbers.
        self.epoch_seconds = Histogram("esper_epoch_seconds", "Wall time of a training epoch.",
                                       ["run"], registry=r,
                                       buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))
        self.kernel_latency = Histogram("esper_kernel_latency_ms",
                                        "Latency of judged kernels, as the bench measured it.",
                                        registry=r, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 50))
        self.metric_delta = Histogram("esper_field_report_metric_delta",
                                      "post_metric - pre_metric of finished adaptations.",
                                      ["outcome"], registry=r,
                                      buckets=(-0.1, -0.01, -0.001, 0, 0.001, 0.01, 0.1))
        # Gauges: the state at the last refresh.
        self.run_epoch = Gauge("esper_run_epoch", "Last epoch reported by a run.", ["run"],
                               registry=r)
        self.run_loss = Gauge("esper_run_loss", "Last losses of a run.", ["run", "split"],
                              registry=r)
        self.run_accuracy = Gauge("esper_run_validation_accuracy",
                                  "Last validation accuracy of a run.", ["run"], registry=r)
        self.run_epoch_age = Gauge("esper_run_seconds_since_epoch",
                                   "Seconds since a run's last epoch event.", ["run"], registry=r)
        self.seeds = Gauge("esper_seeds", "Seeds by lifecycle stage.",
                           ["run", "layer", "stage"], registry=r)
        self.blueprints = Gauge("esper_catalog_blueprints", "Blueprints in Urza by status.",
                                ["status"], registry=r)
        self.kernels = Gauge("esper_catalog_kernels", "Kernels in Urza by status.", ["status"],
                             registry=r)
        self.stream_length = Gauge("esper_stream_entries", "Entries held in a bus stream.",
                                   ["topic"], registry=r)
        self.group_pending = Gauge("esper_consumer_group_pending",
                                   "Entries delivered to a group and not acknowledged.",
                                   ["topic", "group"], registry=r)
        self.group_lag = Gauge("esper_consumer_group_lag",
                               "Entries not yet delivered to a group.", ["topic", "group"],
                               registry=r)
        self.heartbeat_age = Gauge("esper_daemon_seconds_since_heartbeat",
                                   "Seconds since a daemon's last heartbeat.",
                                   ["daemon", "worker", "state"], registry=r)
        self.alerts = Gauge("esper_alert_firing", "1 for every alert firing now.",
                            ["rule", "subject"], registry=r)
        self.bus_up = Gauge("esper_bus_up", "1 when the watcher reaches the bus.", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (port 0: any free one); returns the port. A host or port
        that cannot be bound is the user's to change: a BadInputError naming both."""
        try:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except UnicodeError:  # the idna codec refuses the name: an empty or over-long label
            raise BadInputError(f"metrics host {host!r}: not a valid host name") from None
        except OSError as e:  # no such host, not an address of this machine, the port taken
            raise BadInputError(f"cannot serve metrics on {host!r} port {port}: "
                                f"{e.strerror or e}") from None
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe(self, envelope: Envelope) -> None:
        """Count one event the state accepted."""
        self.events.labels(envelope.topic.value).inc()
        m = envelope.payload
        if isinstance(m, SeedTransition):
            self.transitions.labels(m.run_id, m.to_stage.value).inc()
        elif isinstance(m, TamiyoDecision):
            self.decisions.labels(m.run_id, m.action).inc()
        elif isinstance(m, FieldReport):
            self.field_reports.labels(m.outcome.value).inc()
            self.metric_delta.labels(m.outcome.value).observe(m.post_metric - m.pre_metric)
        elif isinstance(m, KernelReady):
            self.kernels_ready.labels(m.pipeline, m.target).inc()
        elif isinstance(m, CompilationFailed):
            self.compilation_failures.labels(m.stage).inc()
        elif isinstance(m, KernelCharacterized):
            self.kernels_judged.labels(m.status).inc()
            if m.latency_ms is not None:
                self.kernel_latency.observe(m.latency_ms)
        elif isinstance(m, EpochEvent):
            self.epoch_seconds.labels(m.run_id).observe(m.epoch_seconds)
        elif isinstance(m, DaemonHeartbeat):
            self.heartbeats.labels(m.daemon, m.worker_id).inc()

    def update(self, state: WatchState, alerts: Sequence[Alert], now: float | None = None) -> None:
        """Set every gauge from the state (labels that vanished are dropped)."""
        now = time.time() if now is None else now
        for gauge in (self.run_epoch, self.run_loss, self.run_accuracy, self.run_epoch_age,
                      self.seeds, self.blueprints, self.kernels, self.stream_length,
                      self.group_pending, self.group_lag, self.heartbeat_age, self.alerts):
            gauge.clear()
        for run in state.runs.values():
            if run.epoch is not None:
                self.run_epoch.labels(run.run_id).set(run.epoch)
            if run.train_loss is not None:
                self.run_loss.labels(run.run_id, "train").set(run.train_loss)
            if run.validation_loss is not None:
                self.run_loss.labels(run.run_id, "validation").set(run.validation_loss)
            if run.validation_accuracy is not None:
                self.run_accuracy.labels(run.run_id).set(run.validation_accuracy)
            if run.last_epoch_at is not None:
                self.run_epoch_age.labels(run.run_id).set(now - run.last_epoch_at)
            for layer, stages in run.seeds_by_layer().items():
                for stage, n in stages.items():
                    self.seeds.labels(run.run_id, str(layer), stage.value).set(n)
        for status, n in state.catalog_counts("blueprints").items():
            self.blueprints.labels(status).set(n)
        for status, n in state.catalog_counts("kernels").items():
            self.kernels.labels(status).set(n)
        for topic, n in state.stream_lengths.items():
            self.stream_length.labels(topic.value).set(n)
        for topic, groups in state.groups.items():
            for g in groups:
                self.group_pending.labels(topic.value, g.name).set(g.pending)
                if g.lag is not None:
                    self.group_lag.labels(topic.value, g.name).set(g.lag)
        for d in state.daemons.values():
            self.heartbeat_age.labels(d.daemon, d.worker_id, d.state).set(now - d.last_beat_at)
        for alert in alerts:
            self.alerts.labels(alert.rule, alert.subject).set(1)
        self.bus_up.set(0 if state.bus_error else 1)
