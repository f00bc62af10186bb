"""TolariaTrainer: the epoch loop that hosts Kasmina's seeds and obeys Tamiyo (DESIGN.md 12).

    model, report = esper.wrap(build_model(...), config.kasmina)
    tamiyo = esper.TamiyoController(model, config.tamiyo)
    model, history = esper.TolariaTrainer(model, tamiyo, config.tolaria).train()

One epoch, top to bottom (`_run_epoch`):

1. schedule: the epoch's lr (a function of the epoch alone) and the data order (of the seed and
   the epoch alone, EpochShuffle);
2. train steps: forward, task loss (plus `guard.distill`'s penalty while grafts blend),
   backward (TRAINING seeds learn their own objective from a hook on their layer's output),
   gradient clipping, optimizer step, step time;
3. evaluate: validation loss, and accuracy for classification (and the guarded task's);
4. end-of-epoch hook: the layers' HealthSignals (one host sync per layer), the
   SystemStatePacket, `tamiyo.step`; then either an emergency rollback (Tamiyo's divergence
   check, an operator's force_rollback, or a corrupt seed state Kasmina reports) or the
   boundary: Tamiyo's commands dispatched, Kasmina's transitions applied, the optimizer rebuilt
   keeping its state when seed parameters came or went;
5. records: decisions and field reports to the bus and Urza, metrics.jsonl, a checkpoint,
   `system.events.epoch`.

Determinism: the same config and seed give the same lineage and bit-identical weights on CPU. The
run's RNGs are seeded at the start; the data order depends on (seed, epoch) only; kernel loads
run off the training thread, and the hook waits for the ones started an epoch earlier before it
reads readiness, so a seed's stage never depends on how fast a load was (no training step ever
waits: only the boundary would, for a load slower than a whole epoch); every checkpoint holds
all RNG state, so resumed and rolled-back runs replay exactly.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import kasmina
from esper._fs import atomic_write_text
from esper.contracts import (
    EpochEvent,
    FieldReport,
    GuardReading,
    HardwareContext,
    HealthSignal,
    RunControlAction,
    SeedLifecycle,
    Topic,
)
from esper.errors import BadInputError, EsperError
from esper.tamiyo.heuristic import GUARDED
from esper.tamiyo.packets import build_state_packet, seed_key
from esper.tolaria.checkpoint import (
    CheckpointStore,
    capture_rng,
    load_optimizer_state,
    optimizer_state,
    restore_rng,
    seed_everything,
)
from esper.tolaria.config import TrainConfig
from esper.tolaria.data import DataBundle, build_data, make_loaders
from esper.tolaria.events import TrainingBus
from esper.tolaria.export import (
    ModelOrigin,
    build_lineage,
    remember_lineage,
    remember_origin,
    save_model,
)
from esper.tolaria.optim import (
    SeedParameterIndex,
    build_optimizer,
    lr_at,
    rebuild_optimizer,
    set_lr,
)
from kasmina.lifecycle import BLENDING

log = logging.getLogger("esper.tolaria")
S = SeedLifecycle
STATE_FORMAT = "esper.tolaria.state/1"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Stages in which a seed is growing: the "during germination" of the step-time target.
GROWING = frozenset({S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION,
                     S.EVALUATING, S.FINE_TUNING})


class TrainingDivergedError(EsperError):
    """The run diverged and no rollback is left (disabled, or `rollback.max_rollbacks` spent)."""


@dataclass(frozen=True)
class ProgressEvent:
    """What the trainer tells a progress display. `kind`:

    - `start`: `epoch` is the last epoch done (0, or where a resume starts), `epochs` the total,
      `steps` the steps per epoch;
    - `step`: step `step` of `steps` of epoch `epoch` finished (no loss: reading it would sync);
    - `epoch`: epoch `epoch` finished; `record` is its metrics.jsonl line;
    - `rollback`: the run went back to epoch `epoch`; `text` says why (the summary keeps it
      among its notices; no `notice` event repeats it);
    - `notice`: something the user should read once (`text`);
    - `end`: the run is over; `record` is the summary.
    """

    kind: Literal["start", "step", "epoch", "rollback", "notice", "end"]
    run_id: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    record: dict[str, Any] | None = None
    text: str = ""


Progress = Callable[[ProgressEvent], None]


@dataclass
class TrainingHistory:
    """What `train()` returns beside the model: the run's records."""

    run_id: str
    run_dir: Path | None
    epochs: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl lines
    field_reports: list[FieldReport] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    status: Literal["completed", "stopped", "diverged"] = "completed"


def new_run_id(name: str) -> str:
    """`<config name>-<UTC time>-<4 hex>`: unique, sortable, one path component."""
    return f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def write_run_config(run_dir: Path, config: TrainConfig) -> None:
    """The config.json that --resume reads, written atomically (a killed write leaves the old)."""
    atomic_write_text(run_dir / CONFIG_FILE,
                      json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")


def resolve_device(spec: str | torch.device) -> torch.device:
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {spec!r}: CUDA is not available here (use device: cpu)")
    return device


class _StepTimer:
    """Per-step wall time. On CUDA, event pairs read once per epoch (no sync per step); the GPU
    timeline between them includes any host-side stall before the step's kernels were queued."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[Any, Any]] = []
        self._times: list[float] = []
        self._t0 = 0.0
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._times.append((time.perf_counter() - self._t0) * 1e3)

    def take(self) -> list[float]:
        """The epoch's step times in ms (sync on CUDA: once per epoch)."""
        if self.cuda:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in self._events]
        else:
            times = self._times
        self._events, self._times = [], []
        return times


class TolariaTrainer:
    """Trains a wrapped model under a TamiyoController for `config.epochs` epochs.

    `model` is wrapped by `kasmina.wrap`; `controller` is its TamiyoController; `config` a
    TrainConfig (`config.tolaria`). Optional:

    - `data`: a DataBundle; default `build_data(config.data)`.
    - `workspace`: kernels load through the verifying loader (VALIDATED, signed) when the model
      has no kernel source yet; Tamiyo gets the catalog's kernels when it has none; decisions
      and field reports are stored in Urza; events go to the workspace's embedded bus.
    - `urza`: an open Urza of `workspace` to use (else one is opened and closed here).
    - `bus`: a TrainingBus; default: one on `redis_url` / `config.telemetry.redis_url` / the
      workspace's embedded Redis when `config.telemetry.bus` is on and one of those exists.
    - `run_id`, `run_dir`: default a new id, and `<config.out_dir>/<run id>` (relative to the
      workspace, else to the working directory).
    - `resume`: continue from the newest checkpoint in `run_dir` (none yet: start from epoch 0).
    - `progress`: called with ProgressEvents.
    - `origin`: how the host was built (run_training sets it), so that save_model can record it.
    """

    def __init__(self, model: nn.Module, controller: Any, config: TrainConfig, *,
                 data: DataBundle | None = None, workspace: Any = None, urza: Any = None,
                 bus: TrainingBus | None = None, redis_url: str | None = None,
                 run_id: str | None = None, run_dir: str | os.PathLike[str] | None = None,
                 device: str | torch.device | None = None, resume: bool = False,
                 progress: Progress | None = None, origin: ModelOrigin | None = None,
                 notices: list[str] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise BadInputError(f"TolariaTrainer takes a TrainConfig (config.tolaria), not "
                                f"{type(config).__name__}")
        self.config = config
        self.model = model
        self.tamiyo = controller
        self.device = resolve_device(device if device is not None else config.device)
        self.data = data if data is not None else build_data(config.data, seed=config.data_seed)
        self.guard_data = None if config.guard is None else _guard_data(config, self.data)
        metric = config.tamiyo.plateau.metric
        if self.data.task == "regression" and metric == "validation_accuracy":
            raise BadInputError("invalid run config: field 'tamiyo.plateau.metric': a regression "
                                "task has no validation_accuracy; use validation_loss")
        self.run_id = run_id or getattr(controller, "run_id", "") or new_run_id(config.name)
        if not controller.run_id:
            controller.run_id = self.run_id
        elif controller.run_id != self.run_id:
            raise BadInputError(f"the controller's run id {controller.run_id!r} is not the "
                                f"trainer's {self.run_id!r}")
        self.workspace = workspace
        if run_dir is None:
            root = Path(config.out_dir)
            if not root.is_absolute():
                root = (Path(workspace.root) if workspace is not None else Path.cwd()) / root
            run_dir = root / self.run_id
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.origin = origin
        self._owned: list[Any] = []
        self.urza = urza
        if workspace is not None and urza is None:
            from esper.urza import Urza

            self.urza = Urza.open(workspace)
            self._owned.append(self.urza)
        if workspace is not None and all(layer.cache is None for layer in kasmina.layers(model)):
            from pipelines.tezzeret.loader import VerifiedKernelSource

            source = VerifiedKernelSource(workspace)
            kasmina.attach_kernel_source(model, source)
            self._owned.append(source)
        if self.urza is not None and getattr(controller, "chooser", None) is None:
            from esper.tamiyo import UrzaKernelChooser

            controller.chooser = UrzaKernelChooser(self.urza)
        url = redis_url or config.telemetry.redis_url
        self.bus = bus
        if bus is None and config.telemetry.bus and (url or workspace is not None):
            self.bus = TrainingBus.open(workspace, url, run_id=self.run_id)
            self._owned.append(self.bus)
        self.history = TrainingHistory(self.run_id, self.run_dir, notices=list(notices or []))
        self.checkpoints = CheckpointStore(self.run_dir / CHECKPOINTS_DIR, config.checkpoints.keep_last)
        # Run state (all of it in every checkpoint).
        self.epoch = 0
        self.global_step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._germinated_at: dict[str, int] = {}
        self._faults_fired: set[int] = set()
        self._paused: str | None = None
        self._stop: str | None = None
        self._controls: list[Any] = []
        self._said: set[str] = set()
        self._froze_heap = False
        self._guard_reference: float | None = None  # the guarded task's metric at the start
        classes = None if config.guard is None else config.guard.data.classes
        # guard.distill's classes on the device (None: all of them)
        self._guard_classes = None if classes is None else torch.tensor(sorted(classes), device=self.device)

    # --- the run ------------------------------------------------------------------------

    def train(self) -> tuple[nn.Module, TrainingHistory]:
        """Run every epoch left; write the outputs; return (model, history)."""
        started = time.perf_counter()
        try:
            given = list(self.history.notices)  # the caller's; _setup says its own as they come
            self._setup()
            for text in given:
                self._emit("notice", text=text)
            while self.epoch < self.config.epochs and self._stop is None:
                self._run_epoch(self.epoch + 1)
            self.history.status = "stopped" if self._stop else "completed"
            self._finish(time.perf_counter() - started)
        except TrainingDivergedError as e:
            # The run ended: say how in its folder, or it reads as one killed mid-run.
            self.history.status, self._stop = "diverged", str(e)
            self._finish(time.perf_counter() - started)
            raise
        finally:
            self._close()
        return self.model, self.history

    def _setup(self) -> None:
        config = self.config
        self.model.to(self.device)
        self.train_loader, self.val_loader = make_loaders(
            self.data, config.data.batch_size, seed=config.seed,
            eval_batch_size=config.data.eval_batch_size)
        self.steps_per_epoch = len(self.train_loader)
        if self.guard_data is not None:
            self.guard_loader = make_loaders(self.guard_data, config.data.batch_size, seed=config.seed,
                                             eval_batch_size=config.data.eval_batch_size)[1]
        self._timer = _StepTimer(self.device)
        if self.origin is not None:
            remember_origin(self.model, self.origin)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest = self.checkpoints.latest()
        if self.resume and latest is not None:
            checkpoint, tensors, state, damaged = self.checkpoints.newest_verified()
            kept = [self.checkpoints.set_aside(c).name for c, _ in damaged]
            self._restore(checkpoint, tensors, state, resuming=True)
            text = f"resumed run {self.run_id} from {checkpoint.path.name} (epoch {self.epoch})"
            if damaged:  # one line: what was wrong, where it went, where the run goes on from
                text += (f", the newest checkpoint that verifies: {damaged[0][1]}"
                         + "".join(f"; {e}" for _, e in damaged[1:])
                         + f" (kept as {', '.join(kept)})")
            self._notice(text)
        else:
            if latest is not None:
                raise BadInputError(f"{self.run_dir} already holds a run; resume it or choose "
                                    "another run id")
            if self.resume:  # stopped before its first checkpoint: nothing to restore
                self._notice(f"run {self.run_id} was stopped before its first checkpoint: "
                             "starting it from epoch 0")
            seed_everything(config.seed)
            if self.guard_data is not None:
                self._guard_reference = self._guard_metric()
            write_run_config(self.run_dir, config)
            self.optimizer = build_optimizer(self.model, config.optimizer)
            self._write_metrics()
            self._checkpoint()  # epoch 0: the first known-good state
        self._say_running()
        self._warm_up()
        self._freeze_heap()
        self._emit("start", epoch=self.epoch, steps=self.steps_per_epoch)

    def _say_running(self) -> None:
        """summary.json says "running" until the run's end writes the full one: a resumed run
        that dies first (killed, an exception) leaves "running", not how an earlier session ended
        (`esper watch` would show that outcome for a run dead mid-way)."""
        running = {"run_id": self.run_id, "status": "running", "stop_reason": None,
                   "epochs": self.epoch, "epochs_planned": self.config.epochs,
                   "global_step": self.global_step, "device": str(self.device)}
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(running, indent=2) + "\n")

    def _warm_up(self) -> None:
        """When seeds are growing or blending (a resume, a rollback): pay their first-call costs
        now rather than in the first steps (Kasmina's `warm_up`: Triton's compile of the blend
        kernels, the seed banks' first vmap). Kasmina warms up at each boundary by itself, from
        the batch shapes its layers have run; a new process's layers have run none, so one
        evaluation-mode forward without gradients of a training batch (and of the last, partial
        one) shows them. That forward changes no state (no step count, telemetry, alpha ramp or
        running statistic moves in evaluation mode) and the RNG state is put back."""
        layers = list(kasmina.layers(self.model))
        if not any(s in GROWING or s in BLENDING for layer in layers for s in layer.stages):
            return
        batch = self.config.data.batch_size
        sizes = [min(batch, len(self.data.train))]
        if len(self.data.train) % batch and len(self.data.train) > batch:
            sizes.append(len(self.data.train) % batch)
        was_training = self.model.training
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            x, _ = next(iter(DataLoader(self.data.train, batch_size=batch)))
            self.model.eval()
            with torch.no_grad():
                for size in sizes:
                    self.model(x[:size].to(self.device))
            self.model.train(was_training)
            for layer in layers:
                layer.warm_up()

    def _freeze_heap(self) -> None:
        """Collect garbage once, then move every object alive now (torch, Triton, the model, the
        data) to the collector's permanent generation: a full collection during training walks
        only what training allocated since, not the ~335 thousand objects of the imports (a full
        pass over them took 105-260 ms on the H100 host, about once an epoch, stalling the loop).
        Undone at the end of the run if this run froze first."""
        if not self._froze_heap and gc.get_freeze_count() == 0:
            self._froze_heap = True
        gc.collect()
        gc.freeze()

    # --- one epoch ----------------------------------------------------------------------

    def _run_epoch(self, epoch: int) -> None:
        config = self.config
        # Schedule: lr and data order are functions of the epoch alone.
        lr = lr_at(config.schedule, config.optimizer.lr, epoch, config.epochs)
        set_lr(self.optimizer, lr)
        self.train_loader.sampler.set_epoch(epoch)
        stages_during = self._stage_counts()
        began = time.perf_counter()

        # Train steps.
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        steps = 0
        layers = kasmina.layers(self.model)  # once an epoch: a walk of every module, not per step
        distilled = self._distilled(layers)  # stages change only at epoch boundaries
        for x, y in self.train_loader:
            self._timer.start()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            output = self.model(x)
            loss = self._loss(output, y)
            if steps == 0 and epoch in config.faults.nan_loss_epochs and epoch not in self._faults_fired:
                self._faults_fired.add(epoch)
                loss = loss * float("nan")  # injected fault: the run diverges from here
            objective = loss + self._distillation(x, output, distilled) if distilled else loss
            if objective.requires_grad:  # a frozen host (`model.freeze`) with nothing training: no graph
                objective.backward()
            for layer in layers:  # kasmina.observe_loss
                layer.observe_loss(loss)
            if config.optimizer.grad_clip_norm is not None:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, config.optimizer.grad_clip_norm)
            self.optimizer.step()
            loss_sum += loss.detach()
            steps += 1
            self.global_step += 1
            self._timer.stop()
            every = config.telemetry.report_every_steps
            if every is not None and self.bus is not None and self.global_step % every == 0:
                self._publish_health(epoch, reset=False)  # sync: once per report interval
            self._emit("step", epoch=epoch, step=steps, steps=self.steps_per_epoch)
            if self._poll_controls():
                return  # stop: the partial epoch is not checkpointed; --resume replays it
        step_ms = self._timer.take()
        train_loss = (loss_sum / max(steps, 1)).item()  # sync: once per epoch

        # Evaluate.
        val_loss, val_accuracy = self._evaluate()

        # End-of-epoch hook.
        for layer in kasmina.layers(self.model):
            layer.wait_for_loads()  # loads started an epoch ago: readiness must not race them
        self._report_failed_loads()
        forced = self._apply_controls()  # pause and resume count from this epoch end
        health = [layer.health_signal(self.run_id, epoch, self.global_step)  # sync: per layer
                  for layer in kasmina.layers(self.model)]
        guard = self._read_guard(health) if self.guard_data is not None else None
        packet = build_state_packet(self.run_id, epoch, health, validation_loss=val_loss,
                                    validation_accuracy=val_accuracy, train_loss=train_loss,
                                    global_step=self.global_step, hardware=self._hardware(),
                                    guard=guard)
        signal = self.tamiyo.step(packet, health)
        for message in health:
            self._publish(Topic.TELEMETRY_SEED_HEALTH, message)
        if signal.emergency_rollback_required or forced:
            reason = signal.rollback_reason if signal.emergency_rollback_required else forced
            suspect = (self.tamiyo.rollback_suspect if signal.emergency_rollback_required
                       else self._suspect())
            self._rollback(epoch, reason, suspect)
            return
        before = SeedParameterIndex.of(self.model)
        kasmina.dispatch(self.model, signal.commands)
        boundary = kasmina.on_epoch_end(self.model, epoch, self.run_id)
        self.tamiyo.observe_boundary(boundary)
        corrupt = [b.rollback_requested for b in boundary if b.rollback_requested]
        if corrupt:
            self._rollback(epoch, "Kasmina reports corrupt seed state: " + "; ".join(corrupt), None)
            return
        for report in boundary:
            for t in report.transitions:
                self._publish(Topic.LIFECYCLE_SEED_TRANSITIONS, t)
                if t.to_stage is S.GERMINATED:
                    self._germinated_at[t.seed_id] = epoch
            for incident in report.incidents:
                self._notice(f"seed {incident.seed_id} ({incident.kernel_artifact_id}): "
                             f"{incident.error}", once=False)
        if signal.optimizer_rebuild_required or any(b.optimizer_rebuild_required for b in boundary):
            self.optimizer = rebuild_optimizer(self.optimizer, self.model, config.optimizer, before)
        self._drain_controller()

        # Records: metrics, checkpoint, heartbeat.
        seconds = time.perf_counter() - began
        record = {
            "epoch": epoch, "global_step": self.global_step, "train_loss": train_loss,
            "validation_loss": val_loss, "validation_accuracy": val_accuracy, "lr": lr,
            "epoch_seconds": round(seconds, 6),
            "step_ms": [round(t, 4) for t in step_ms],
            "step_ms_median": _median(step_ms), "step_ms_max": max(step_ms, default=0.0),
            "stages_during": stages_during, "stages_after": self._stage_counts(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "rollbacks": len(self.history.rollbacks),
        }
        if guard is not None:
            record["guard"] = {"metric": guard.metric, "reference": guard.reference,
                               "value": guard.value, "without": guard.without}
        self.history.epochs.append(record)
        self.epoch = epoch
        self._write_metrics()
        if epoch % config.checkpoints.every_epochs == 0 or epoch == config.epochs:
            self._checkpoint()
        after = record["stages_after"]
        self._publish(Topic.SYSTEM_EVENTS_EPOCH, EpochEvent(
            run_id=self.run_id, epoch=epoch, global_step=self.global_step,
            train_loss=_finite(train_loss), validation_loss=_finite(val_loss),
            validation_accuracy=val_accuracy, learning_rate=lr,
            active_seeds=sum(n for s, n in after.items() if S(s) in GROWING),
            fossilized_seeds=after.get(S.FOSSILIZED.value, 0), epoch_seconds=seconds,
            epochs_planned=config.epochs))
        self._emit("epoch", epoch=epoch, record=record)

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.data.task == "classification":
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)

    @torch.no_grad()
    def _evaluate(self, loader: Any = None, classes: list[int] | None = None,
                  ) -> tuple[float, float | None]:
        """Validation loss (mean over samples; MSE per element for regression) and accuracy, on
        `loader` (default: the validation set); with `classes`, accuracy is read within them
        (the argmax over those classes' logits only)."""
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        own = None if classes is None else torch.tensor(sorted(classes), device=self.device)
        n = 0
        for x, y in self.val_loader if loader is None else loader:
            x, y = x.to(self.device), y.to(self.device)
            out = self.model(x)
            if self.data.task == "classification":
                total += F.cross_entropy(out, y, reduction="sum").double()
                predicted = out.argmax(dim=1) if own is None else own[out[:, own].argmax(dim=1)]
                correct += (predicted == y).sum()
            else:
                total += F.mse_loss(out, y, reduction="sum").double() / max(out[0].numel(), 1)
            n += len(y)
        loss = (total / max(n, 1)).item()  # sync: once per evaluation
        accuracy = correct.item() / max(n, 1) if self.data.task == "classification" else None
        return loss, accuracy

    def _distilled(self, layers: list[kasmina.KasminaLayer]) -> list[str]:
        """The grafts `guard.distill` holds off the guarded task's outputs: every blending one."""
        guard = self.config.guard
        if guard is None or guard.distill == 0:
            return []
        return [f"{layer.layer_id}:{index}" for layer in layers
                for index, stage in enumerate(layer.stages) if stage in BLENDING]

    def _distillation(self, x: torch.Tensor, output: torch.Tensor, grafts: list[str]) -> torch.Tensor:
        """`guard.distill`'s penalty on how far `grafts` move the guarded task's outputs of this
        batch from the host's own (GuardConfig)."""
        guard = self.config.guard
        self.model.eval()  # no telemetry, no seed step: a read of the host alone
        try:
            with torch.no_grad(), kasmina.seeds_disabled(self.model, grafts):
                host = self.model(x)
        finally:
            self.model.train()
        return distillation(output, host, self.data.task, self._guard_classes, guard.distill,
                            guard.temperature)

    def _guard_metric(self) -> float:
        """The guarded task's metric: accuracy within its classes, or a regression's loss."""
        loss, accuracy = self._evaluate(self.guard_loader, self.config.guard.data.classes)
        return loss if accuracy is None else accuracy

    def _read_guard(self, health: list[HealthSignal]) -> GuardReading:
        """The guarded task now and, when it reads worse than at the start, without each graft
        that blends and is not yet fossilized: the with/without comparison Tamiyo culls on."""
        reading = GuardReading(metric="loss" if self.data.task == "regression" else "accuracy",
                               reference=self._guard_reference, value=self._guard_metric())
        if reading.degradation() <= 0:
            return reading
        without = {}
        for signal in health:
            for index, stage in enumerate(signal.lifecycle):
                if stage in GUARDED:
                    sid = f"{signal.layer_id}:{index}"
                    with kasmina.seeds_disabled(self.model, [sid]):
                        without[sid] = self._guard_metric()
        return reading.model_copy(update={"without": without})

    def _report_failed_loads(self) -> None:
        """Say once why a germinated seed's kernel did not load (a refused signature or hash).

        Workaround: Kasmina records a load failure as an incident only once the seed is in
        LOADING, and a GERMINATED seed whose load failed is never ready, so Tamiyo cancels it
        after `max_loading_epochs` without the reason; the failed future is read here."""
        for layer in kasmina.layers(self.model):
            for index, future in sorted(getattr(layer, "_loads", {}).items()):
                if future.done() and future.exception() is not None:
                    self._notice(f"seed {layer.layer_id}:{index}: kernel {layer.kernel_of(index)} "
                                 f"refused: {future.exception()}")

    # --- control.run -----------------------------------------------------------------

    def _poll_controls(self) -> bool:
        """Take RunControls off the bus (cheap: a deque); True when the run must stop now."""
        if self.bus is not None:
            for control in self.bus.controls():
                if control.action is RunControlAction.STOP:
                    self._stop = control.reason or "stop requested"
                    self._notice(f"stop requested: {self._stop}")
                else:
                    self._controls.append(control)
        return self._stop is not None

    def _apply_controls(self) -> str | None:
        """Pause and resume take effect now; a force_rollback's reason is returned."""
        self._poll_controls()
        forced = None
        for control in self._controls:
            why = f" ({control.reason})" if control.reason else ""
            if control.action is RunControlAction.PAUSE:
                self._paused = control.reason or "paused by an operator"
                self.tamiyo.pause_germination(self._paused)
                self._notice(f"germination paused{why}", once=False)
            elif control.action is RunControlAction.RESUME:
                self._paused = None
                self.tamiyo.resume_germination()
                self._notice(f"germination resumed{why}", once=False)
            elif control.action is RunControlAction.FORCE_ROLLBACK:
                forced = f"rollback forced by an operator{why}"
        self._controls = []
        return forced

    # --- rollback --------------------------------------------------------------------

    def _suspect(self) -> str | None:
        """For a forced rollback: the most recently germinated graft that touches the forward
        pass (Tamiyo's rule for its own divergence check)."""
        live = []
        for layer in kasmina.layers(self.model):
            for index, stage in enumerate(layer.stages):
                sid = f"{layer.layer_id}:{index}"
                if stage in BLENDING and stage is not S.FOSSILIZED:
                    live.append((self._germinated_at.get(sid, -1), seed_key(sid), sid))
        return max(live)[2] if live else None

    def _rollback(self, epoch: int, reason: str, suspect: str | None) -> None:
        """Restore the last known-good checkpoint bit-exactly, quarantine the suspect seed
        (ROLLED_BACK, with its field report), and make that the new known-good state."""
        config = self.config.rollback
        self.history.rollbacks.append({"epoch": epoch, "reason": reason, "seed_id": suspect})
        if not config.enabled or len(self.history.rollbacks) > config.max_rollbacks:
            self._drain_controller()
            why = ("rollback is disabled" if not config.enabled
                   else f"{config.max_rollbacks} rollback(s) of rollback.max_rollbacks are spent")
            raise TrainingDivergedError(f"run {self.run_id} diverged at epoch {epoch} ({reason}) "
                                        f"and {why}")
        latest = self.checkpoints.latest()
        self._restore(latest, *latest.read(), resuming=False)
        self.tamiyo.on_rollback(suspect, reason)
        if suspect is not None:
            layer_id, index = seed_key(suspect)
            layer = next(la for la in kasmina.layers(self.model) if la.layer_id == layer_id)
            if S.ROLLED_BACK in _next_stages(layer.stage(index)):
                before = SeedParameterIndex.of(self.model)
                transition = layer.transition(index, S.ROLLED_BACK, reason=f"emergency rollback: {reason}",
                                              run_id=self.run_id)
                self._publish(Topic.LIFECYCLE_SEED_TRANSITIONS, transition)
                self.optimizer = rebuild_optimizer(self.optimizer, self.model,
                                                   self.config.optimizer, before)
        self._drain_controller()
        self._checkpoint()  # the restored state, seed quarantined: the new known-good one
        self._warm_up()
        self._freeze_heap()
        text = (f"epoch {epoch}: {reason}; rolled back to epoch {self.epoch}"
                + (f", seed {suspect} quarantined (ROLLED_BACK)" if suspect else ""))
        # One line: a "rollback" event (the display's red line), recorded as a notice.
        self._notice(text, once=False, kind="rollback", epoch=self.epoch)

    # --- checkpoints -----------------------------------------------------------------

    def _checkpoint(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optim_tensors, optim_meta = optimizer_state(self.optimizer, self.model)
        rng_tensors, rng_meta = capture_rng()
        tensors |= optim_tensors | rng_tensors
        state = {
            "state_format": STATE_FORMAT, "run_id": self.run_id, "global_step": self.global_step,
            "optimizer": optim_meta, "rng": rng_meta,
            "schedule": {"name": self.config.schedule.name,
                         "lr": self.optimizer.param_groups[0]["lr"]},
            "data_epoch": self.epoch,
            "tamiyo": self.tamiyo.state_dict(),
            "history": self.history.epochs,
            "field_reports": [json.loads(r.to_json()) for r in self.history.field_reports],
            "rollbacks": self.history.rollbacks,
            "germinated_at": self._germinated_at,
            "faults_fired": sorted(self._faults_fired),
            "paused": self._paused,
            "guard_reference": self._guard_reference,
        }
        self.checkpoints.write(self.epoch, tensors, state)

    def _restore(self, checkpoint, tensors: dict[str, torch.Tensor], state: dict[str, Any], *,
                 resuming: bool) -> None:
        """Load a checkpoint already read (and so verified): `Checkpoint.read()`."""
        if state.get("state_format") != STATE_FORMAT:
            raise EsperError(f"{checkpoint.path}: not a Tolaria run state ({STATE_FORMAT})")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer = build_optimizer(self.model, self.config.optimizer)
        load_optimizer_state(self.optimizer, self.model, tensors, state["optimizer"])
        restore_rng(tensors, state["rng"])
        self.tamiyo.load_state_dict(state["tamiyo"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history.epochs = list(state["history"])
        self._germinated_at = {k: int(v) for k, v in state["germinated_at"].items()}
        self._guard_reference = state.get("guard_reference")
        if resuming:
            # A new process: what a rollback must not forget comes from the checkpoint too.
            self.history.field_reports = [
                FieldReport.from_jsonable(r, source=f"checkpoint epoch {state['epoch']}: field report")
                for r in state["field_reports"]]
            self.history.rollbacks = list(state["rollbacks"])
            self._faults_fired = set(state["faults_fired"])
            self._paused = state["paused"]
            if self._paused is not None:
                self.tamiyo.pause_germination(self._paused)
            self._write_metrics()

    # --- records ---------------------------------------------------------------------

    def _drain_controller(self) -> None:
        """Tamiyo's decisions and field reports: to the bus and to Urza."""
        for decision in self.tamiyo.drain_decisions():
            self._publish(Topic.CONTROL_TAMIYO_DECISIONS, decision)
            self._store("record_decision", decision)
            if (decision.action == "wait" and "No VALIDATED kernel" in decision.explanation
                    and not any("no VALIDATED kernel" in n for n in self.history.notices)):
                # Tamiyo's why (per interface: none built, too risky, over the budget...).
                why = decision.explanation.partition("without growing. ")[2].rstrip(".")
                self._notice("no VALIDATED kernel fits a free seed: training goes on without "
                             f"growing ({why or 'run `esper forge` and `esper bench`'})")
        for report in self.tamiyo.drain_field_reports():
            self.history.field_reports.append(report)
            self._publish(Topic.INNOVATION_FIELD_REPORTS, report)
            self._store("record_field_report", report)

    def _store(self, method: str, record: Any) -> None:
        if self.urza is None:
            return
        try:
            getattr(self.urza, method)(record, actor="tamiyo")
        except (EsperError, sqlite3.Error) as e:
            self._notice(f"Urza did not store a {type(record).__name__}: {e}", once=False)

    def _publish(self, topic: Topic, message: Any) -> None:
        if self.bus is not None:
            self.bus.publish(topic, message)

    def _publish_health(self, epoch: int, reset: bool) -> None:
        for layer in kasmina.layers(self.model):
            self._publish(Topic.TELEMETRY_SEED_HEALTH,
                          layer.health_signal(self.run_id, epoch, self.global_step, reset=reset))

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history.epochs)
        atomic_write_text(self.run_dir / METRICS_FILE, lines)

    def _notice(self, text: str, *, once: bool = True, kind: str = "notice",
                **fields: Any) -> None:
        """Say `text` once (unless not `once`): in the summary's notices, and as one progress
        event of `kind` (a notice, or a rollback with its `epoch`) or else one log line."""
        if once and text in self._said:
            return
        self._said.add(text)
        if text not in self.history.notices:
            self.history.notices.append(text)
        # Said once: by the progress display when there is one (`esper train`), else in the log.
        log.log(logging.INFO if self.progress is None else logging.DEBUG, "tolaria: %s", text)
        self._emit(kind, text=text, **fields)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(kind=kind, run_id=self.run_id,
                                        epochs=self.config.epochs, **fields))

    def _stage_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in kasmina.layers(self.model):
            for stage in layer.stages:
                if stage is not S.DORMANT:
                    counts[stage.value] = counts.get(stage.value, 0) + 1
        return dict(sorted(counts.items()))

    def _hardware(self) -> HardwareContext:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return HardwareContext(device_type="cuda", device_name=torch.cuda.get_device_name(self.device),
                                   memory_available_gb=free / 2**30)
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 0
        return HardwareContext(device_type="cpu", device_name="cpu", memory_available_gb=free / 2**30)

    # --- the end ---------------------------------------------------------------------

    def _finish(self, seconds: float) -> None:
        history = self.history
        metric = self.config.tamiyo.plateau.metric
        history.lineage = build_lineage(self.model, history.field_reports, run_id=self.run_id,
                                        metric=metric, urza=self.urza)
        # A diverged run's model in memory is the diverged one (its checkpoints hold the last
        # good state): none is saved.
        if history.status != "diverged":
            remember_lineage(self.model, history.lineage)
            save_model(self.model, self.run_dir, metadata={"run_id": self.run_id})
        history.summary = self._summary(seconds)
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(history.summary, indent=2) + "\n")
        self._emit("end", epoch=self.epoch, record=history.summary)

    def _summary(self, seconds: float) -> dict[str, Any]:
        history = self.history
        last = history.epochs[-1] if history.epochs else {}
        outcomes: dict[str, int] = {}
        for report in history.field_reports:
            outcomes[report.outcome.value] = outcomes.get(report.outcome.value, 0) + 1
        steps = [t for r in history.epochs for t in r["step_ms"]]
        growing = [t for r in history.epochs
                   if any(S(s) in GROWING for s in r["stages_during"]) for t in r["step_ms"]]
        quiet = [t for r in history.epochs
                 if not any(S(s) in GROWING for s in r["stages_during"]) for t in r["step_ms"]]
        best = min((r["validation_loss"] for r in history.epochs
                    if math.isfinite(r["validation_loss"])), default=None)
        outputs = (METRICS_FILE, SUMMARY_FILE)
        if history.status != "diverged":
            outputs = ("model.safetensors", "model.json", "lineage.json", *outputs)
        return {
            "run_id": self.run_id, "status": history.status, "stop_reason": self._stop,
            "epochs": self.epoch, "epochs_planned": self.config.epochs,
            "global_step": self.global_step, "device": str(self.device),
            "train_loss": last.get("train_loss"), "validation_loss": last.get("validation_loss"),
            "validation_accuracy": last.get("validation_accuracy"),
            "best_validation_loss": best,
            "guard": ({k: last["guard"][k] for k in ("metric", "reference", "value")}
                      if "guard" in last else None),
            "germinations": sum(outcomes.values()) + len(self.tamiyo.active_seeds),
            "outcomes": dict(sorted(outcomes.items())),
            "fossilized": len(history.lineage.get("adaptations", [])),
            "rollbacks": len(history.rollbacks),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "host_parameters": sum(p.numel() for p in kasmina.host_parameters(self.model)),
            "step_ms_median": _median(steps), "step_ms_max": max(steps, default=0.0),
            "step_ms_median_quiet": _median(quiet), "step_ms_max_growing": max(growing, default=None),
            "wall_seconds": round(seconds, 3),
            "bus_dropped": (self.bus.dropped if self.bus is not None else 0),
            "notices": list(history.notices),
            "outputs": {name: str(self.run_dir / name) for name in outputs},
        }

    def _close(self) -> None:
        if self._froze_heap:
            gc.unfreeze()
            self._froze_heap = False
        for owned in reversed(self._owned):
            try:
                owned.close()
            except Exception as e:  # noqa: BLE001 - closing never hides the run's own error
                log.warning("tolaria: closing %s: %s", type(owned).__name__, e)
        self._owned = []


def _next_stages(stage: SeedLifecycle) -> frozenset[SeedLifecycle]:
    from esper.contracts import LIFECYCLE_TRANSITIONS

    return LIFECYCLE_TRANSITIONS[stage]


def distillation(output: torch.Tensor, host: torch.Tensor, task: str, classes: torch.Tensor | None,
                 weight: float, temperature: float) -> torch.Tensor:
    """`guard.distill`'s penalty: `weight * temperature**2 * KL(host || output)` over the softmax
    of `classes`' logits (all of them when None) at `temperature`; for a regression
    `weight * MSE(output, host)`."""
    if task == "regression":
        return weight * F.mse_loss(output, host)
    if classes is not None:
        output, host = output[:, classes], host[:, classes]
    t = temperature
    return weight * t * t * F.kl_div(F.log_softmax(output / t, dim=1), F.log_softmax(host / t, dim=1),
                                     log_target=True, reduction="batchmean")


def _guard_data(config: TrainConfig, data: DataBundle) -> DataBundle:
    """The guarded task's data (`guard.data`, generated and split from the run's data seed
    unless it names its own: build_data lets `spec.seed` win), checked against the run's task
    and output width."""
    guard = build_data(config.guard.data, seed=config.data_seed, field="guard.data")
    if (guard.task, guard.out_dim) != (data.task, data.out_dim):
        raise BadInputError(f"invalid run config: field 'guard.data': {guard.name!r} is a "
                            f"{guard.task} task with {guard.out_dim} outputs; the run's data "
                            f"{data.name!r} is a {data.task} task with {data.out_dim}")
    return guard


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _finite(value: float) -> float:
    """EpochEvent carries floats JSON can hold: a diverged loss is sent as the largest float."""
    if math.isnan(value):
        return 3e38
    return max(min(value, 3e38), -3e38)

