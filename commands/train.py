"""`esper train`: Tolaria + Kasmina + Tamiyo, one run from one YAML file.

A plain command, not a sub-app like the others: a group would stop parsing options at the first
positional argument, and `esper train CONFIG key=value --resume ...` mixes them."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from esper_cli.context import err_console, get_context, out_console


def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Argument(
        help="The run's YAML config (see configs/quickstart.yaml). Optional with --resume.",
        show_default=False)] = None,
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key.sub=value overrides of the config (`epochs=30 optimizer.lr=3e-3`).",
        show_default=False)] = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue a killed or stopped run from its last checkpoint: a run id under the "
        "runs directory, or a run directory.", show_default=False)] = None,
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda, cuda:N or auto (overrides the config's `device`).",
        show_default=False)] = None,
    policy: Annotated[str | None, typer.Option(
        help="Tamiyo's policy: heuristic (overrides `tamiyo.policy`).",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where runs go (overrides `out_dir`; relative paths are under the workspace).",
        show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Train this many epochs in all (overrides `epochs`; with --resume, "
        "continue to it).", show_default=False)] = None,
    run_id: Annotated[str | None, typer.Option(
        help="Name the run instead of NAME-TIME-HEX.", show_default=False)] = None,
) -> None:
    """Train a model that grows where it needs to (Tolaria, Kasmina and Tamiyo).

    Wraps the configured layers with dormant seeds, trains, and at every epoch end lets Tamiyo
    germinate a VALIDATED kernel from the workspace's library where training stalls, taking it
    through the lifecycle and keeping it only if it helps. Checkpoints every epoch; a divergence
    rolls back; Ctrl-C or SIGTERM stops the run (exit 130) for --resume to continue. Outputs go
    to runs/RUN_ID/ (model.safetensors, lineage.json, metrics.jsonl); the summary to stdout.
    Events go to the bus when it is up; training never waits for it.

    Example: esper train configs/quickstart.yaml epochs=30 optimizer.lr=3e-3
    """
    from esper.errors import BadInputError
    from esper.tolaria.config import load_config
    from esper.tolaria.run import run_training

    ectx = get_context(ctx)
    changes = [f"device={device}"] * (device is not None)
    changes += [f"tamiyo.policy={policy}"] * (policy is not None)
    changes += [f"out_dir={out}"] * (out is not None)
    changes += [f"epochs={epochs}"] * (epochs is not None)
    if config is None and resume is None:
        raise BadInputError("give a config file (esper train CONFIG) or --resume RUN")
    if resume is not None and config is not None and "=" in config.name and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None  # `--resume RUN epochs=30`
    if config is None and overrides:
        raise BadInputError("overrides need a config file; with --resume alone, only --epochs, "
                            "--device and --out apply")
    workspace = ectx.workspace if ectx.workspace.exists() else None
    if config is not None:
        train_config = load_config(config, [*(overrides or []), *changes])
    elif changes:
        train_config = _saved_config(resume, workspace, changes)
    else:
        train_config = None
    progress = _Progress()
    try:
        with _sigterm_interrupts():
            result = run_training(train_config, workspace=workspace, redis_url=ectx.redis_url,
                                  resume=resume, progress=progress, run_id=run_id)
    except BadInputError as e:
        # A setting the config file checks out on, refused once the model is built (a kasmina
        # pattern that matches no module, a model that fails to import): name the file too.
        if config is not None and str(e).startswith("field '"):
            raise BadInputError(f"{config}: {e}") from None
        raise
    except KeyboardInterrupt:
        progress.close()
        if progress.run_id is not None:  # started: its config and a checkpoint are on disk
            out_dir = train_config.out_dir if train_config is not None else out
            again = f"esper train --resume {resume or progress.run_id}" + (
                f" --out {out_dir}" if out_dir is not None and str(out_dir) != "runs" else "")
            err_console.print(f"interrupted: run {progress.run_id} continues from its last "
                              f"checkpoint with `{again}`", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        progress.close()
    ectx.emit(result.summary, lambda: _render(result.summary))


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a supervisor, `kill`, a scheduler's preemption) stops the run as Ctrl-C does: a
    KeyboardInterrupt, so the bus and the catalog close, the run lock is released and the
    command exits 130; the partial epoch is replayed by --resume. Without this the process died
    at once (exit 143), its bus never told it was stopping."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _saved_config(resume: str, workspace, changes: list[str]):
    """A resumed run's saved config with --epochs/--device/--out applied."""
    from esper.tolaria.config import TrainConfig, apply_override
    from esper.tolaria.run import find_run, saved_config
    from esper.tolaria.trainer import CONFIG_FILE

    out_dir = next((c.split("=", 1)[1] for c in changes if c.startswith("out_dir=")), None)
    run_dir = find_run(resume, workspace, out_dir)
    data = saved_config(run_dir).model_dump(mode="json")
    for change in changes:
        apply_override(data, change, str(run_dir / CONFIG_FILE))
    return TrainConfig.from_mapping(data, source=str(run_dir / CONFIG_FILE))


class _Progress:
    """Bars for epochs and steps on a terminal; one line per epoch (and notice) elsewhere."""

    def __init__(self) -> None:
        self.bars = None
        self.epoch_task = self.step_task = None
        self.run_id: str | None = None  # once the run has started

    def __call__(self, event) -> None:
        if event.kind == "notice":
            self._line(Text.assemble(("note", "yellow"), f" {event.text}"), event.text)
        elif event.kind == "rollback":
            # The text says which epoch failed, why, where the run went back to, what was
            # quarantined; a rollback is not also shown as a note.
            self._line(Text.assemble(("rollback", "red"), f": {event.text}"),
                       f"rollback: {event.text}")
        elif event.kind == "start":
            self.run_id = event.run_id
            self._start(event)
        elif event.kind == "step" and self.bars is not None:
            self.bars.update(self.step_task, completed=event.step, total=event.steps)
        elif event.kind == "epoch":
            self._epoch(event)

    def _start(self, event) -> None:
        if not err_console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.close()
        # The description holds the run id, the user's: text, not markup.
        self.bars = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                             transient=True)
        self.bars.start()
        self.epoch_task = self.bars.add_task(f"run {event.run_id}", total=event.epochs,
                                             completed=event.epoch)
        self.step_task = self.bars.add_task("  steps", total=event.steps)

    def _epoch(self, event) -> None:
        line = _epoch_line(event.record or {}, event.epoch, event.epochs)
        if self.bars is not None:
            self.bars.update(self.epoch_task, completed=event.epoch)
            self.bars.update(self.step_task, completed=0)
        self._line(Text(line), line)

    def _line(self, styled: Text, plain: str) -> None:
        if self.bars is not None:
            self.bars.console.print(styled, soft_wrap=True)
        elif err_console.is_terminal:
            err_console.print(styled, soft_wrap=True)
        else:
            sys.stderr.write(plain + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None


def _epoch_line(record: dict[str, Any], epoch: int, epochs: int) -> str:
    parts = [f"epoch {epoch}/{epochs}"]
    for key, label in (("train_loss", "loss"), ("validation_loss", "val_loss"),
                       ("validation_accuracy", "val_acc")):
        value = record.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.4f}")
    if record.get("guard"):
        parts.append(f"guard {record['guard']['value']:.4f}")
    stages = {k: v for k, v in (record.get("stages_after") or {}).items() if k != "DORMANT"}
    if stages:
        parts.append("seeds " + " ".join(f"{k}:{v}" for k, v in sorted(stages.items())))
    return "  ".join(parts)


def _render(summary: dict[str, Any]) -> None:
    from commands._render import print_table

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        return str(value)

    keys = [("run", "run_id"), ("status", "status"), ("epochs", "epochs"),
            ("device", "device"), ("train loss", "train_loss"),
            ("validation loss", "validation_loss"), ("validation accuracy", "validation_accuracy"),
            ("germinations", "germinations"), ("outcomes", "outcomes"),
            ("fossilized", "fossilized"), ("rollbacks", "rollbacks"),
            ("parameters (host)", "host_parameters"), ("parameters (all)", "parameters"),
            ("step ms, median", "step_ms_median"),
            ("step ms, max while growing", "step_ms_max_growing"),
            ("wall seconds", "wall_seconds")]
    rows = [[label, fmt(summary.get(key))] for label, key in keys]
    guard = summary.get("guard")
    if guard:  # after the validation accuracy: the earlier task, at the start and now
        rows.insert(7, [f"guarded task {guard['metric']}",
                        f"{fmt(guard['reference'])} -> {fmt(guard['value'])}"])
    print_table("run", ["", "value"], rows, wrap=("value",))
    outputs = summary.get("outputs") or {}
    if outputs:
        out_console.print(f"outputs in {Path(next(iter(outputs.values()))).parent}",
                          highlight=False, soft_wrap=True)
