"""The watcher: the bus reader, the state, the alert rules and the metrics, in one loop.

    watcher = Watcher(workspace, url, since_ms=parse_since("1h"), rules=AlertRules())
    events = watcher.start()              # the backlog since --since
    alerts = watcher.refresh()            # Urza counts, group info, alert rules, metrics
    while True:
        events = watcher.step(block_ms=500)   # what arrived since (XREAD, no group)
        alerts = watcher.refresh()

Every event is read, parsed and folded in, unless `sample_telemetry`: then (the dashboard) the
telemetry firehose (SAMPLED_TOPICS; epoch events too when no metrics are served) is sampled, the
newest SAMPLE_COUNT entries per `tick`, and
`tick()` replaces `step()`: one batch of reads per redraw instead of one XREAD per event burst.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from esper.contracts import Envelope, Topic
from esper.errors import EsperError
from esper.nissa.alerts import Alert, AlertRules, evaluate
from esper.nissa.metrics import WatchMetrics
from esper.nissa.reader import (
    SAMPLED_TOPICS,
    SAMPLED_WITHOUT_METRICS,
    WATCHED_TOPICS,
    BusReader,
    entry_order,
)
from esper.nissa.state import RUN_OUTCOMES, RunView, WatchState
from esper.urza import Urza
from esper.workspace import Workspace

log = logging.getLogger("esper.nissa")

# `esper watch --once` exits with this when an alert fires (cron pages on a non-zero exit);
# 1, 2 and 3 keep their meaning of DESIGN.md section 14.
ALERT_EXIT_CODE = 4
# Urza's counts and the groups' XINFO are read at most this often.
REFRESH_S = 2.0
# A run's record of how it ended, in its folder (esper.tolaria.trainer.SUMMARY_FILE; Nissa sits
# below Tolaria and does not import it).
RUN_SUMMARY_FILE = "summary.json"


class Watcher:
    def __init__(self, workspace: Workspace | None, url: str | None, *, since_ms: int,
                 rules: AlertRules | None = None, topics: Sequence[Topic] = WATCHED_TOPICS,
                 run: str | None = None, metrics: WatchMetrics | None = None,
                 publish_alerts: bool = True, start_embedded: bool = True,
                 sample_telemetry: bool = False, warn_when_down: bool = True):
        self.workspace = workspace
        self.reader = BusReader(workspace, url, topics, start_embedded=start_embedded,
                                sampled=() if not sample_telemetry else SAMPLED_TOPICS
                                if metrics is not None else SAMPLED_WITHOUT_METRICS,
                                warn_when_down=warn_when_down)
        self.state = WatchState(run_filter=run)
        self.rules = rules or AlertRules()
        self.metrics = metrics
        self.publish_alerts = publish_alerts
        self.since_ms = since_ms
        self.alerts: list[Alert] = []
        self.new_alerts: list[Alert] = []  # started firing at the last refresh
        self._urza: Urza | None = None
        self._last_refresh = 0.0
        self._planned_looked_up: set[str] = set()
        self._outcomes_looked_up: set[tuple[str, float]] = set()  # (run, when it ended)

    # Events -------------------------------------------------------------------------------------
    def start(self) -> list[Envelope]:
        """Read the backlog since `since_ms`; returns the events kept (run filter applied)."""
        return self._apply([e.envelope for e in self.reader.backlog(self.since_ms)])

    def step(self, block_ms: int | None = None) -> list[Envelope]:
        """Read what arrived since the last read, waiting up to `block_ms` for it."""
        return self._apply([e.envelope for e in self.reader.poll(block_ms=block_ms)])

    def tick(self) -> list[Envelope]:
        """Without waiting: everything the tailed topics got since the last read, then the
        newest entries of the sampled ones."""
        entries = sorted(self.reader.drain() + self.reader.sample(), key=entry_order)
        return self._apply([e.envelope for e in entries])

    def _apply(self, envelopes: list[Envelope]) -> list[Envelope]:
        kept = [e for e in envelopes if self.state.apply(e)]
        if self.metrics is not None:
            for envelope in kept:
                self.metrics.observe(envelope)
        return kept

    # Slow reads, alerts, metrics ----------------------------------------------------------------
    def refresh(self, *, force: bool = False, now: float | None = None) -> list[Alert]:
        """Re-read Urza and XINFO (at most every REFRESH_S unless `force`), evaluate the rules,
        publish the alerts that started firing, update the metrics; returns the firing alerts."""
        if force or time.monotonic() - self._last_refresh >= REFRESH_S:
            self._last_refresh = time.monotonic()
            self.state.groups = self.reader.groups()
            self.state.stream_lengths = self.reader.lengths()
            self._read_catalog()
        self.state.bus_error = self.reader.error
        alerts = evaluate(self.state, self.rules, now=now)
        before = {a.key for a in self.alerts}
        self.new_alerts = [a for a in alerts if a.key not in before]
        self.alerts = alerts
        if self.publish_alerts:
            for alert in self.new_alerts:
                self.reader.publish(Topic.SYSTEM_ALERTS, alert.to_contract())
        if self.metrics is not None:
            self.metrics.update(self.state, alerts, now=now)
        return alerts

    def _read_catalog(self) -> None:
        if self.workspace is None or not self.workspace.db_path.exists():
            return  # a watcher never creates a catalog
        try:
            if self._urza is None:
                self._urza = Urza.open(self.workspace)
            self.state.catalog = self._urza.stats()
            for run in self.state.runs.values():
                ended = run.ended_at is not None and run.outcome is None and (
                    (run.run_id, run.ended_at) not in self._outcomes_looked_up)
                if run.run_id in self._planned_looked_up and not ended:
                    continue
                try:
                    config = json.loads(self._urza.get_run(run.run_id).config_json)
                except EsperError:
                    continue  # not registered (yet): judged by its epoch events alone
                if not isinstance(config, dict):
                    continue
                self._planned_looked_up.add(run.run_id)
                epochs = config.get("epochs")
                if isinstance(epochs, int):
                    run.plan_from_config(epochs)
                if ended:
                    self._outcomes_looked_up.add((run.run_id, run.ended_at))
                    run.outcome = self._outcome(run, config)
        except EsperError as e:
            log.warning("nissa: cannot read the catalog: %s", e)

    def _outcome(self, run: RunView, config: dict) -> str | None:
        """How a run that ended says it did: `status` of the summary.json in its folder (written
        before its last heartbeat; the bus carries no such word), where its registered config
        puts it (`out_dir`, relative to the workspace). None when there is none to read (a run
        interrupted or failed, a folder elsewhere) or it is of an earlier end of the run."""
        out_dir = config.get("out_dir", "runs")
        if self.workspace is None or not isinstance(out_dir, str):
            return None
        root = Path(out_dir).expanduser()
        path = (root if root.is_absolute() else self.workspace.root / root) / run.run_id
        try:
            summary = json.loads((path / RUN_SUMMARY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(summary, dict) or summary.get("status") not in RUN_OUTCOMES:
            return None
        if run.epoch is not None and summary.get("epochs") != run.epoch:
            return None  # an earlier session's summary: this one ended without writing its own
        return summary["status"]

    def close(self) -> None:
        self.reader.close()
        if self._urza is not None:
            self._urza.close()
            self._urza = None
        if self.metrics is not None:
            self.metrics.close()
