"""How the watcher's state reads: a rich dashboard for a terminal, one plain line per event and
per alert elsewhere (a pipe, a log file, cron)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from esper.contracts import (
    CompilationFailed,
    DaemonHeartbeat,
    Envelope,
    EpochEvent,
    FieldReport,
    HealthSignal,
    KernelCharacterized,
    KernelReady,
    NissaAlert,
    RunControl,
    SeedLifecycle,
    SeedTransition,
    TamiyoDecision,
    Topic,
)
from esper.nissa.alerts import Alert
from esper.nissa.state import WatchState

# Stages in lifecycle order, so a seed's progress reads left to right.
STAGE_ORDER = list(SeedLifecycle)
PIPELINE_TOPICS = (Topic.COMPILATION_BLUEPRINT_SUBMITTED, Topic.COMPILATION_KERNEL_READY,
                   Topic.VALIDATION_KERNEL_CHARACTERIZED, Topic.INNOVATION_FIELD_REPORTS)


def _num(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(title: str, columns: Sequence[str], wrap: Sequence[str] = ()) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", expand=False,
                  pad_edge=False, title_style="bold cyan")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=False,
                         ratio=2 if column in wrap else None)
    return table


def render_dashboard(state: WatchState, alerts: Sequence[Alert], *,
                     now: float | None = None, where: str = "") -> RenderableType:
    """The whole dashboard as one rich renderable; rich folds it to the terminal's width."""
    now = time.time() if now is None else now
    parts: list[RenderableType] = []
    bus = (Text(f"bus DOWN: {state.bus_error}", style="bold red") if state.bus_error
           else Text(f"bus ok {where}".rstrip(), style="green"))
    header = Text.assemble(Text("esper watch ", style="bold"), bus,
                           f"  events {sum(state.events.values())}",
                           f"  alerts {len(alerts)}", f"  {datetime.now():%H:%M:%S}")
    parts.append(header)
    if alerts:
        lines = Text("\n".join(f"{a.rule}: {a.message}" for a in alerts), style="bold red")
        parts.append(Panel(lines, title="ALERTS", border_style="red", title_align="left"))

    runs = _table("runs", ["run", "epoch", "train", "val", "acc", "active", "fossil", "last"])
    seeds = _table("seeds by stage", ["run", "layer", "stages"], wrap=("stages",))
    # Every stage change, even those between two redraws, where the counts above skip a stage.
    moves = _table("seed transitions", ["run", "ep", "seed", "transition", "why"], wrap=("why",))
    decisions = _table("Tamiyo decisions", ["run", "ep", "action", "seed", "why"], wrap=("why",))
    for run in state.runs.values():
        epoch = "-" if run.epoch is None else str(run.epoch)
        if run.planned_epochs is not None:
            epoch += f"/{run.planned_epochs}"
        last = "-" if run.last_epoch_at is None else _age(now - run.last_epoch_at)
        runs.add_row(run.run_id, epoch, _num(run.train_loss), _num(run.validation_loss),
                     _num(run.validation_accuracy, ".3f"), str(run.active_seeds),
                     str(run.fossilized_seeds),
                     last + (f" {run.status}" if run.finished else ""))
        for layer, stages in run.seeds_by_layer().items():
            text = " ".join(f"{s.value}:{stages[s]}" for s in STAGE_ORDER if stages.get(s))
            seeds.add_row(run.run_id, run.layer_names.get(layer, str(layer)), text)
        for t in run.transitions:
            moves.add_row(run.run_id, str(t.epoch), t.seed_id,
                          f"{t.from_stage.value} -> {t.to_stage.value}", t.reason or "-")
        for d in run.decisions:
            decisions.add_row(run.run_id, str(d.epoch), d.action, d.seed_id or "-", d.explanation)
    parts += [runs, seeds, moves, decisions] if state.runs else [Text("no runs seen", style="dim")]

    pipeline = _table("pipeline", ["what", "counts"], wrap=("counts",))
    for table in ("blueprints", "kernels"):
        counts = state.catalog_counts(table)
        pipeline.add_row(table, " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-")
    pipeline.add_row("forge", f"{state.throughput_per_min(state.kernels_ready, now):.2f} kernels/"
                              f"min, {state.compilation_failures} failures")
    pipeline.add_row("bench", f"{state.throughput_per_min(state.kernels_judged, now):.2f} judged/"
                              "min, " + " ".join(f"{k}:{v}" for k, v in
                                                  sorted(state.judged.items())))
    pipeline.add_row("queues", " ".join(f"{t.value}:{state.stream_lengths[t]}"
                                        for t in PIPELINE_TOPICS if t in state.stream_lengths)
                     or "-")
    parts.append(pipeline)
    if state.groups:
        groups = _table("consumer groups", ["topic", "group", "consumers", "pending", "lag"])
        for topic, infos in state.groups.items():
            for g in infos:
                groups.add_row(topic.value, g.name, str(g.consumers), str(g.pending),
                               "-" if g.lag is None else str(g.lag))
        parts.append(groups)
    if state.daemons:
        daemons = _table("daemons", ["daemon", "worker", "state", "beat"])
        for d in state.daemons.values():
            daemons.add_row(d.daemon, d.worker_id, d.state, _age(now - d.last_beat_at))
        parts.append(daemons)
    if state.field_reports:
        reports = _table("field reports", ["run", "seed", "outcome", "delta", "reason"],
                         wrap=("reason",))
        for r in reversed(state.field_reports):
            reports.add_row(r.run_id, r.seed_id, r.outcome.value,
                            f"{r.post_metric - r.pre_metric:+.4g}", r.reason)
        parts.append(reports)
    return Group(*parts)


def plain_line(envelope: Envelope) -> str:
    """One line for one event, for a non-terminal stdout."""
    m = envelope.payload
    if isinstance(m, EpochEvent):
        what = (f"run {m.run_id} epoch {m.epoch} step {m.global_step} train_loss "
                f"{m.train_loss:.4g} val_loss {m.validation_loss:.4g} acc "
                f"{_num(m.validation_accuracy, '.3f')} active {m.active_seeds} fossilized "
                f"{m.fossilized_seeds}")
    elif isinstance(m, SeedTransition):
        what = (f"run {m.run_id} seed {m.seed_id} {m.from_stage.value} -> {m.to_stage.value}"
                + (f" ({m.reason})" if m.reason else ""))
    elif isinstance(m, TamiyoDecision):
        what = f"run {m.run_id} epoch {m.epoch} {m.action} {m.seed_id or ''}: {m.explanation}"
    elif isinstance(m, HealthSignal):
        stages = " ".join(f"{s.value}:{m.lifecycle.count(s)}" for s in STAGE_ORDER
                          if s in m.lifecycle)
        what = f"run {m.run_id} layer {m.layer_name} step {m.step} {stages}"
    elif isinstance(m, FieldReport):
        what = (f"run {m.run_id} seed {m.seed_id} {m.outcome.value} "
                f"{m.pre_metric:.4g} -> {m.post_metric:.4g}")
    elif isinstance(m, KernelReady):
        what = f"kernel {m.kernel_artifact_id} ready ({m.pipeline}, {m.target})"
    elif isinstance(m, KernelCharacterized):
        what = f"kernel {m.kernel_artifact_id} {m.status}" + (f": {m.reason}" if m.reason else "")
    elif isinstance(m, CompilationFailed):
        what = f"blueprint {m.blueprint_id[:12]} failed {m.stage}: {m.reason}"
    elif isinstance(m, DaemonHeartbeat):
        what = f"{m.daemon} {m.worker_id} {m.state} (pid {m.pid})"
    elif isinstance(m, RunControl):
        what = f"run {m.run_id} {m.action.value}" + (f": {m.reason}" if m.reason else "")
    elif isinstance(m, NissaAlert):
        what = f"{m.rule} {m.subject}: {m.message}"
    else:
        what = m.to_json()
    return f"{envelope.timestamp:%H:%M:%S} {envelope.topic.value} {envelope.sender_id}: {what}"


def alert_line(alert: Alert) -> str:
    return f"ALERT {alert.rule} {alert.subject}: {alert.message}"
