"""`esper watch`: Nissa, the live view of runs, seeds, decisions, the pipeline and alerts."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from esper_cli.context import err_console, get_context, out_console

# JSON and plain lines: after a read that found events, wait this long before the next one.
BATCH_S = 0.05

app = typer.Typer(no_args_is_help=False, subcommand_metavar="")


@app.callback(invoke_without_command=True)
def watch(
    ctx: typer.Context,
    follow: Annotated[bool, typer.Option(
        "--follow/--once", help="Follow the bus until interrupted (default), or read what is "
        "there, evaluate the alerts, print, and exit: 0 when no alert fires, 4 when one does, "
        "1 when the bus cannot be read (cron pages on either).")] = True,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="One envelope per line on stdout (alerts too, as system.alerts "
        "envelopes), for scripts: every event, telemetry included, so it costs more than the "
        "dashboard, which samples telemetry. The root's --json does the same.")] = False,
    topics: Annotated[str | None, typer.Option(
        help="Comma-separated topics to read (default: all), e.g. "
        "system.events.epoch,lifecycle.seed.transitions.")] = None,
    run: Annotated[str | None, typer.Option(
        help="Only this run's events (pipeline events are always kept).")] = None,
    since: Annotated[str, typer.Option(
        help="Start this far back: 90s, 15m, 2h, 1d, an ISO time, or 'all'.")] = "1h",
    for_seconds: Annotated[float | None, typer.Option(
        "--for", min=0, help="With --follow: stop after this many seconds.")] = None,
    refresh: Annotated[float, typer.Option(
        min=0.05, help="Seconds between dashboard redraws and alert checks (the dashboard reads "
        "the bus once per redraw).")] = 1.0,
    metrics_port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="Serve Prometheus metrics on this port (0: any free port, "
        "printed on stderr).")] = None,
    metrics_host: Annotated[str, typer.Option(
        help="Address the metrics endpoint binds to.")] = "127.0.0.1",
    alerts: Annotated[Path | None, typer.Option(
        "--alerts", help="YAML file of alert thresholds (esper.nissa.AlertRules fields), e.g. "
        "'consumer_lag_max: 500'.")] = None,
    audit: Annotated[str | None, typer.Option(
        "--audit", metavar="RUN", help="Walk the audit hash chain under this run's rows and "
        "report the first broken link (exit 3), then exit.")] = None,
) -> None:
    """Watch training runs, seeds, Tamiyo's decisions, the forge and bench pipeline, daemon
    heartbeats and alerts, live (Nissa).

    Reads the bus without consuming anyone's work (stream reads and XINFO only) and rides out
    a Redis restart. On a terminal: a live dashboard. Elsewhere: one line per event. Alert rules:
    rollback rate, certification rate, consumer lag, stalled daemon, stalled run; firing alerts
    are shown, published on system.alerts and, with --once, give exit code 4; a bus --once
    cannot read gives exit code 1.

    Example: esper watch --once --since 15m || page-someone
    """
    from esper.contracts import Topic
    from esper.errors import BadInputError, BusUnavailableError
    from esper.nissa import AlertRules, Watcher, WatchMetrics, parse_since
    from esper.nissa.reader import WATCHED_TOPICS

    ectx = get_context(ctx)
    if audit is not None:
        _audit(ectx, audit, json_lines or ectx.json)
        return
    chosen = list(WATCHED_TOPICS)
    if topics:
        names = [t.strip() for t in topics.split(",") if t.strip()]
        known = {t.value: t for t in Topic}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BadInputError(f"--topics: unknown topic {unknown[0]!r} (known: "
                                f"{', '.join(sorted(known))})")
        chosen = [known[n] for n in names]
    rules = AlertRules.load(alerts)
    metrics = WatchMetrics() if metrics_port is not None else None
    workspace = ectx.workspace if ectx.workspace.exists() else None
    if workspace is None and not ectx.redis_url:
        ectx.workspace.require()  # one clear line: no workspace here
    as_json = json_lines or ectx.json
    live = out_console.is_terminal and follow and not as_json
    # The dashboard samples the telemetry firehose (the newest HealthSignals per redraw); JSON
    # and plain lines print every event, so they read every one.
    # A cron check never starts a bus, and reports a bus it cannot read itself (below).
    watcher = Watcher(workspace, ectx.redis_url, since_ms=parse_since(since), rules=rules,
                      topics=chosen, run=run, metrics=metrics, sample_telemetry=live,
                      start_embedded=follow, warn_when_down=follow)
    output = _Output(json=as_json, live=live, sender_id=watcher.reader.sender_id,
                     where=_where(ectx))
    try:
        if metrics is not None:
            port = metrics.serve(metrics_port, metrics_host)
            err_console.print(f"metrics on http://{metrics_host}:{port}/metrics",
                              highlight=False, soft_wrap=True)
        if not follow:
            output.events(watcher.start())
            fired = watcher.refresh(force=True)
            if watcher.reader.unreachable:
                # No events read is not "all quiet": a blind check must not pass. (No embedded
                # bus running is no failure: nothing publishes, the catalog's alerts decide.)
                raise BusUnavailableError(f"the bus {_bus_name(ectx)} could not be read, so no "
                                          f"alert was checked ({watcher.reader.error})")
            output.final(watcher.state, fired)
            if fired:
                raise typer.Exit(4)  # esper.nissa.ALERT_EXIT_CODE
            return
        _follow(watcher, output, refresh, for_seconds)
    finally:
        watcher.close()


def _follow(watcher, output, refresh: float, for_seconds: float | None) -> None:
    import time

    stop = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    deadline = None if for_seconds is None else time.monotonic() + for_seconds
    try:
        with output.session(watcher):
            output.events(watcher.start())
            output.update(watcher.state, watcher.refresh(force=True), watcher.new_alerts)
            while output.live and not stop and (deadline is None
                                                or time.monotonic() < deadline):
                # The dashboard: one batch of reads and one redraw per refresh interval.
                wake = time.monotonic() + refresh
                if deadline is not None:
                    wake = min(wake, deadline)
                while not stop and time.monotonic() < wake:
                    time.sleep(min(0.1, max(0.0, wake - time.monotonic())))
                watcher.tick()
                output.update(watcher.state, watcher.refresh(), watcher.new_alerts)
            while not output.live and not stop and (deadline is None
                                                    or time.monotonic() < deadline):
                block = refresh if deadline is None else max(0.01, min(
                    refresh, deadline - time.monotonic()))
                events = watcher.step(block_ms=max(1, int(block * 1000)))
                output.events(events)
                if events and not stop:
                    time.sleep(BATCH_S)  # let a burst gather: one read per batch, not per event
                output.update(watcher.state, watcher.refresh(), watcher.new_alerts)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _where(ectx) -> str:
    if ectx.redis_url:
        from esper.oona import redact_url

        return f"({redact_url(ectx.redis_url)})"
    return "(embedded)"


def _bus_name(ectx) -> str:
    if ectx.redis_url:
        from esper.oona import redact_url

        return f"at {redact_url(ectx.redis_url)}"
    return f"of workspace {ectx.workspace.root}"


def _audit(ectx, run_id: str, as_json: bool) -> None:
    import json

    from esper.nissa import audit_run
    from esper.urza import Urza

    with Urza.open(ectx.workspace.require()) as urza:
        result = audit_run(urza, run_id)
    if as_json:
        sys.stdout.write(json.dumps(result.to_jsonable()) + "\n")
    elif result.ok:
        out_console.print(f"run {run_id}: {result.rows} audit rows check out "
                          f"({result.chain_rows} in the chain)", highlight=False)
    if not result.ok:
        err_console.print(Text.assemble(("error:", "bold red"), f" run {run_id}: audit row "
                                        f"{result.first_bad_seq}: {result.reason}"),
                          soft_wrap=True)
        raise typer.Exit(3)


class _Output:
    """Where the watcher's view goes: a rich.live dashboard, JSON lines, or plain lines."""

    def __init__(self, *, json: bool, live: bool, sender_id: str, where: str):
        self.json = json
        self.live = live and not json
        self.sender_id = sender_id
        self.where = where
        self._live = None

    def session(self, watcher):
        from contextlib import nullcontext

        if not self.live:
            return nullcontext()
        from rich.live import Live

        from esper.nissa.dashboard import render_dashboard

        self._live = Live(render_dashboard(watcher.state, [], where=self.where),
                          console=out_console, auto_refresh=False, redirect_stderr=False)
        return self._live

    def events(self, envelopes) -> None:
        if self.live:
            return  # the dashboard shows them
        if self.json:
            lines = [e.to_json() for e in envelopes]
        else:
            from esper.nissa.dashboard import plain_line

            lines = [plain_line(e) for e in envelopes]
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()

    def update(self, state, alerts, new_alerts) -> None:
        if self._live is not None:
            from esper.nissa.dashboard import render_dashboard

            self._live.update(render_dashboard(state, alerts, where=self.where), refresh=True)
        else:
            self._alerts(new_alerts)

    def final(self, state, alerts) -> None:
        """--once: the dashboard on a terminal, else every firing alert."""
        if not self.json and out_console.is_terminal:
            from esper.nissa.dashboard import render_dashboard

            out_console.print(render_dashboard(state, alerts, where=self.where))
            return
        self._alerts(alerts)
        if not self.json:
            sys.stdout.write(f"{sum(state.events.values())} events, {len(state.runs)} runs, "
                             f"{len(alerts)} alerts firing\n")
            sys.stdout.flush()

    def _alerts(self, alerts) -> None:
        if not alerts:
            return
        if self.json:
            from esper.contracts import Envelope, Topic

            lines = [Envelope.wrap(Topic.SYSTEM_ALERTS, a.to_contract(),
                                   sender_id=self.sender_id).to_json() for a in alerts]
        else:
            from esper.nissa.dashboard import alert_line

            lines = [alert_line(a) for a in alerts]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
