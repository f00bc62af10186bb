"""Nissa, the observability of Esper: what `esper watch` shows, serves and alerts on.

    reader = BusReader(workspace, url, topics)          # XRANGE/XREAD and XINFO only
    state = WatchState(); rules = AlertRules()
    for entry in reader.backlog(since_ms): state.apply(entry.envelope)
    alerts = evaluate(state, rules)

The reader never joins another service's consumer group: it tails streams with plain reads and
looks at groups through XINFO, so watching takes nothing from the forge, the bench or Tamiyo.
"""

from esper.nissa.alerts import Alert, AlertRules, evaluate
from esper.nissa.audit import RunAudit, audit_run
from esper.nissa.metrics import WatchMetrics
from esper.nissa.reader import WATCHED_TOPICS, BusReader, parse_since
from esper.nissa.state import WatchState
from esper.nissa.watch import ALERT_EXIT_CODE, Watcher

__all__ = ["ALERT_EXIT_CODE", "WATCHED_TOPICS", "Alert", "AlertRules", "BusReader", "RunAudit",
           "WatchMetrics", "WatchState", "Watcher", "audit_run", "evaluate", "parse_since"]
