"""TamiyoController: the heuristic controller Tolaria calls at every epoch end (DESIGN.md 11).

The end-of-epoch hook, in Tolaria:

    health = [layer.health_signal(run_id, epoch) for layer in kasmina.layers(model)]  # sync
    packet = build_state_packet(run_id, epoch, health, validation_loss=..., ...)
    signal = tamiyo.step(packet, health)
    if signal.emergency_rollback_required:
        restore the last known-good checkpoint (tamiyo.load_state_dict among the rest)
        tamiyo.on_rollback(tamiyo.rollback_suspect, signal.rollback_reason)
    else:
        kasmina.dispatch(model, signal.commands)
        tamiyo.observe_boundary(kasmina.on_epoch_end(model, epoch, run_id))
        rebuild the optimizer if signal.optimizer_rebuild_required or a boundary report asks
    publish and store tamiyo.drain_decisions() and tamiyo.drain_field_reports()

Tamiyo does no IO besides its kernel chooser (the Urza query and the `tamiyo_interest` bump).
Same inputs, same decisions: every tie is broken by seed id, every id is a counter.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from esper.contracts import (
    AdaptationSignal,
    FieldReport,
    GuardReading,
    HealthSignal,
    KasminaCommandType,
    KasminaControlCommand,
    KernelInterface,
    KernelQuery,
    SeedLifecycle,
    SystemStatePacket,
    TamiyoDecision,
    describe_validation_error,
)
from esper.errors import BadInputError, EsperError
from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.heuristic import (
    LOWER_IS_BETTER,
    LocationScore,
    Plateau,
    Ranking,
    gate,
    improvement,
    rank_bottlenecks,
)
from esper.tamiyo.kernels import KernelCandidate, KernelChooser, UrzaKernelChooser
from esper.tamiyo.packets import TERMINAL_CODES, SeedObservation, SeedTable, seed_key
from kasmina import BoundaryReport, KasminaLayer
from kasmina import layers as kasmina_layers
from kasmina.lifecycle import BLENDING, HOLDS_MODULE, LOAD_FAILED, RUNTIME_ERROR

S = SeedLifecycle
STATE_FORMAT = "esper.tamiyo.heuristic/1"
# Outcomes after which the same kernel is not tried at the same seed again.
_FAILED = (S.CULLED, S.CANCELLED, S.ROLLED_BACK)


@dataclass(frozen=True)
class _Layer:
    """What Tamiyo needs of a KasminaLayer: its seeds' interface and Kasmina's embargo."""

    layer_id: int
    name: str
    seeds: int
    interface: KernelInterface
    embargo_epochs: int


@dataclass
class Adaptation:
    """One germination Tamiyo commanded, from the command to its terminal outcome."""

    seed_id: str
    kernel_artifact_id: str
    blueprint_id: str
    risk_score: float | None
    tags: list[str]
    started_step: int                  # the controller's step count at the germination command
    started_epoch: int
    pre_metrics: dict[str, float]      # the run's metrics at germination
    parameters: int | None = None      # the kernel's measured parameter count; None: unknown
    stage: SeedLifecycle | None = None  # last stage Kasmina reported; None before it did
    epochs_in_stage: int = 0           # epoch ends observed in `stage`
    trained: bool = False              # went through TRAINING (its kernel has parameters)
    expected: SeedLifecycle | None = None  # where Tamiyo's last command sends it
    expected_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("stage", "expected"):
            data[key] = data[key].value if data[key] is not None else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Adaptation:
        data = dict(data)
        for key in ("stage", "expected"):
            data[key] = S(data[key]) if data[key] is not None else None
        data["pre_metrics"] = {k: float(v) for k, v in data["pre_metrics"].items()}
        if data.get("parameters") is not None:  # absent from states saved before it was kept
            data["parameters"] = int(data["parameters"])
        return cls(**data)


@dataclass
class _StepOutput:
    commands: list[KasminaControlCommand] = field(default_factory=list)
    rebuild: bool = False


class TamiyoController:
    """The heuristic controller of DESIGN.md section 11 over a wrapped model's seeds.

    `model_or_layers`: a model wrapped by `kasmina.wrap` (or its KasminaLayers). Kernels come
    from `kernel_chooser`, or from Urza's VALIDATED kernels when `urza` is given; with neither,
    Tamiyo never germinates and says why once. `device_target` and `dtype` are what the
    KernelQuery asks for (the forge's target name: `cpu`, `h100`, ...).
    """

    def __init__(self, model_or_layers: Any, config: TamiyoConfig | Mapping[str, Any] | None = None,
                 *, urza: Any = None, kernel_chooser: KernelChooser | None = None,
                 run_id: str = "", device_target: str = "cpu", dtype: str = "float32") -> None:
        if not isinstance(config, TamiyoConfig):
            config = TamiyoConfig.from_mapping(config)
        if config.policy != "heuristic":
            raise BadInputError(f"tamiyo policy {config.policy!r} is not available yet; use "
                                "'heuristic'")
        if urza is not None and kernel_chooser is not None:
            raise BadInputError("give TamiyoController urza= or kernel_chooser=, not both")
        try:  # what every KernelQuery will carry: refuse a bad target, dtype or tag now
            KernelQuery(target=device_target, dtype=dtype, required_tags=config.kernel.require_tags,
                        preferred_tags=config.kernel.prefer_tags)
        except ValidationError as e:
            raise BadInputError(describe_validation_error(e, "tamiyo kernel query")) from None
        self.config = config
        self.run_id = run_id
        self.device_target = device_target
        self.dtype = dtype
        self.chooser: KernelChooser | None = (
            kernel_chooser if kernel_chooser is not None
            else UrzaKernelChooser(urza) if urza is not None else None)
        found = (kasmina_layers(model_or_layers) if hasattr(model_or_layers, "modules")
                 else list(model_or_layers))
        for layer in found:
            if not isinstance(layer, KasminaLayer):
                raise BadInputError(f"TamiyoController takes a wrapped model or KasminaLayers, "
                                    f"not {type(layer).__name__}")
        self.layers: dict[int, _Layer] = {
            layer.layer_id: _Layer(layer.layer_id, layer.layer_name, layer.seeds,
                                   layer.seed_interface, layer.config.embargo_epochs)
            for layer in sorted(found, key=lambda layer: layer.layer_id)}
        if len(self.layers) != len(found):
            raise BadInputError("two KasminaLayers share a layer id")
        self._metric = config.plateau.metric
        self._reset_state()
        # Not part of the checkpointed state: operator control and this process's outputs.
        self._paused = False
        self._pause_reason = ""
        self._decisions: list[TamiyoDecision] = []
        self._reports: list[FieldReport] = []
        # What this process saw, kept across load_state_dict for the ROLLED_BACK report of an
        # adaptation that the restored checkpoint predates.
        self._recent: dict[str, Adaptation] = {}
        self._latest_metrics: dict[str, float] = {}
        self._latest_epoch = 0
        self.rollback_suspect: str | None = None

    def _reset_state(self) -> None:
        self._steps = 0
        self._epoch = 0
        self._plateau = Plateau()
        self._best_validation_loss: float | None = None
        self._best_train_loss: float | None = None
        self._metrics: dict[str, float] = {}
        self._guard: GuardReading | None = None  # this epoch's guarded task, when there is one
        self._blamed: set[str] = set()  # the grafts this epoch's guard reading culls
        self._germinations = 0
        self._fossilized_parameters = 0  # of the adaptations Tamiyo started (max_added_parameters)
        self._last_end_step: int | None = None
        self._active: dict[str, Adaptation] = {}
        self._embargo_until: dict[str, int] = {}
        self._failed_pairs: set[tuple[str, str]] = set()
        # Kernels that raised at run time here: the error is the host's inputs meeting the
        # kernel (a shape it cannot take), so no other seed of the run gets them either.
        self._broken_kernels: set[str] = set()
        self._notice: str | None = None
        self._counters = {"d": 0, "c": 0, "f": 0}
        # Monotone across loads: a rollback never forgets a rollback.
        self._rollbacks = 0
        self._quarantined: set[str] = set()
        self._rolled_back_kernels: set[str] = set()

    # --- public surface ----------------------------------------------------------------------

    @property
    def active_seeds(self) -> list[str]:
        """Seeds with an adaptation Tamiyo started and that has not ended."""
        return sorted(self._active, key=seed_key)

    @property
    def quarantined_seeds(self) -> list[str]:
        """Seeds locked after a rollback: never germinated again in this run."""
        return sorted(self._quarantined, key=seed_key)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause_germination(self, reason: str = "") -> None:
        """Start no new adaptation (RunControl pause); those under way go on through their gates."""
        self._paused, self._pause_reason = True, reason

    def resume_germination(self) -> None:
        self._paused, self._pause_reason = False, ""

    def drain_decisions(self) -> list[TamiyoDecision]:
        """Every decision since the last drain, in order, each with its explanation."""
        out, self._decisions = self._decisions, []
        return out

    def drain_field_reports(self) -> list[FieldReport]:
        """A FieldReport per adaptation that ended: FOSSILIZED, CULLED, CANCELLED, ROLLED_BACK."""
        out, self._reports = self._reports, []
        return out

    # --- the epoch end -----------------------------------------------------------------------

    def step(self, packet: SystemStatePacket,
             health: Sequence[HealthSignal] | None = None) -> AdaptationSignal:
        """Decide at an epoch end. Seeds are read from `health` when given, else from the
        packet's `seed_states` and `health_map`. The commands are for the boundary that follows
        (`kasmina.dispatch`, then `kasmina.on_epoch_end`)."""
        if not isinstance(packet, SystemStatePacket):
            raise BadInputError(f"step takes a SystemStatePacket, not {type(packet).__name__}")
        seen = (SeedTable.from_health(health) if health is not None
                else SeedTable.from_maps(packet.seed_states, packet.health_map))
        if self.layers and not len(seen):
            raise BadInputError("tamiyo step got no seeds: pass the layers' HealthSignals, or a "
                                "packet built by build_state_packet")
        self._check_seeds(seen)
        self.run_id = self.run_id or packet.run_id
        if getattr(packet, self._metric) is None:
            raise BadInputError(f"tamiyo watches {self._metric} (plateau.metric) but the packet "
                                f"of epoch {packet.current_epoch} carries none")
        self._steps += 1
        self.rollback_suspect = None
        # What happened at the last boundary, dated and judged as of the epoch it ended.
        self._reconcile(seen)
        self._epoch = packet.current_epoch
        self._embargo_until = {sid: until for sid, until in self._embargo_until.items()
                               if until > self._steps}

        metrics = _finite_metrics(packet)
        self._latest_metrics.update(metrics)
        self._latest_epoch = packet.current_epoch
        diverged = self._divergence(packet)
        if diverged is not None:
            return self._rollback_signal(diverged)
        self._metrics = metrics
        self._guard = packet.guard
        self._blamed = set() if packet.guard is None else set(
            packet.guard.blamed(self.config.gates.guard_max_degradation))
        best = self._best_validation_loss
        self._best_validation_loss = (metrics["validation_loss"] if best is None
                                      else min(best, metrics["validation_loss"]))
        if "train_loss" in metrics:
            best = self._best_train_loss
            self._best_train_loss = (metrics["train_loss"] if best is None
                                     else min(best, metrics["train_loss"]))
        self._plateau.update(metrics[self._metric], lower_is_better=LOWER_IS_BETTER[self._metric],
                             min_delta=self.config.plateau.min_delta,
                             min_delta_relative=self.config.plateau.min_delta_relative,
                             slowdown=self.config.plateau.slowdown)

        out = _StepOutput()
        self._mark_quarantined(seen, out)
        for sid in self.active_seeds:
            row = seen.row(sid)
            if row is not None:
                self._apply_gate(self._active[sid], seen.observation(row), out)
        self._maybe_germinate(seen, out)
        # LOADING -> TRAINING happens by itself at this boundary and creates parameters.
        out.rebuild |= any(a.stage is S.LOADING and a.expected is None
                           for a in self._active.values())
        return AdaptationSignal(optimizer_rebuild_required=out.rebuild,
                                emergency_rollback_required=False, commands=out.commands)

    def observe_boundary(self, reports: Iterable[BoundaryReport]) -> None:
        """What Kasmina did at the boundary after `step` (the return of `kasmina.on_epoch_end`):
        terminal outcomes are reported at once, with Kasmina's reason when it acted by itself;
        a refused germination is noted. Optional: `step` finds the same from the next health
        signals, but only this sees an outcome at the run's last boundary."""
        for report in reports:
            for t in report.transitions:
                self._check_seed_id(t.seed_id)
                self._note_stage(t.seed_id, t.to_stage, boundary_step=self._steps)
                a = self._active.get(t.seed_id)
                if a is not None and t.to_stage.is_terminal:
                    self._close(a, t.to_stage, t.reason, boundary_step=self._steps)
            for command, why in report.rejected:
                self._refused(command, why)

    def on_rollback(self, seed_id: str | None, reason: str) -> None:
        """Tolaria rolled the run back, blaming `seed_id` (None: no seed). The seed is
        quarantined for the rest of the run and, if an adaptation Tamiyo started there was under
        way (now, or in the restored state), its ROLLED_BACK FieldReport is emitted. Call it
        before or after `load_state_dict`."""
        self._rollbacks += 1
        name = f"{self._prefix()}-rollback{self._rollbacks}"
        epoch = max(self._epoch, self._latest_epoch)  # the epoch that failed, in either order
        if seed_id is None:
            self._decisions.append(self._decision(
                "rollback", f"Rollback: {reason}. No seed was blamed.", decision_id=name,
                epoch=epoch))
            return
        self._check_seed_id(seed_id)
        # This process's adaptation under way there, else the one the restored state holds.
        restored = self._active.pop(seed_id, None)
        adaptation = self._recent.get(seed_id) or restored
        if seed_id in self._quarantined:
            text = f"Rollback: {reason}. Seed {seed_id} was already quarantined."
        else:
            self._quarantined.add(seed_id)
            text = (f"Rollback: {reason}. Seed {seed_id} is quarantined (ROLLED_BACK) for the "
                    "rest of the run")
            if adaptation is not None:
                self._rolled_back_kernels.add(adaptation.kernel_artifact_id)
                text += (f"; kernel {adaptation.kernel_artifact_id} is not used again in this run"
                         "; field report sent.")
                self._report(adaptation, S.ROLLED_BACK, reason, self._latest_metrics or
                             self._metrics, report_id=f"{name}-report", epoch=epoch)
            else:
                text += "; Tamiyo had no adaptation there, so no field report."
        self._decisions.append(self._decision(
            "rollback", text, seed=seed_id, decision_id=name, epoch=epoch,
            kernel=adaptation.kernel_artifact_id if adaptation else None))

    # --- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the policy decides from, as plain JSON values."""
        return {
            "format": STATE_FORMAT,
            "steps": self._steps,
            "epoch": self._epoch,
            "plateau": self._plateau.to_json(),
            "best_validation_loss": self._best_validation_loss,
            "best_train_loss": self._best_train_loss,
            "metrics": dict(sorted(self._metrics.items())),
            "germinations": self._germinations,
            "fossilized_parameters": self._fossilized_parameters,
            "last_end_step": self._last_end_step,
            "active": [self._active[sid].to_json() for sid in self.active_seeds],
            "embargo_until": {sid: self._embargo_until[sid]
                              for sid in sorted(self._embargo_until, key=seed_key)},
            "failed_pairs": sorted([list(p) for p in self._failed_pairs]),
            "broken_kernels": sorted(self._broken_kernels),
            "notice": self._notice,
            "counters": dict(self._counters),
            "rollbacks": self._rollbacks,
            "quarantined": self.quarantined_seeds,
            "rolled_back_kernels": sorted(self._rolled_back_kernels),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`. Exact, except what a rollback must not forget: the rollback
        count (ids stay unique) and the quarantined seeds and rolled-back kernels are merged
        with this controller's; an adaptation at a quarantined seed is dropped (its outcome was
        reported). Pause and the undrained outputs are left as they are."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise BadInputError(f"not a Tamiyo state ({STATE_FORMAT}): {found!r}")
        previous = self.state_dict()
        try:
            self._load(state)
        except (KeyError, TypeError, ValueError, AttributeError, BadInputError) as e:
            self._rollbacks = previous["rollbacks"]
            self._quarantined = set(previous["quarantined"])
            self._rolled_back_kernels = set(previous["rolled_back_kernels"])
            self._load(previous)
            raise BadInputError(f"malformed Tamiyo state: {type(e).__name__}: {e}") from None

    def _load(self, state: Mapping[str, Any]) -> None:
        rollbacks, quarantined = self._rollbacks, set(self._quarantined)
        rolled_back = set(self._rolled_back_kernels)
        self._reset_state()
        self._steps = int(state["steps"])
        self._epoch = int(state["epoch"])
        self._plateau = Plateau.from_json(state["plateau"])
        best = state["best_validation_loss"]
        self._best_validation_loss = None if best is None else float(best)
        best = state.get("best_train_loss")  # absent from states saved before it was kept
        self._best_train_loss = None if best is None else float(best)
        self._metrics = {k: float(v) for k, v in state["metrics"].items()}
        self._germinations = int(state["germinations"])
        # Absent from states saved before max_added_parameters: what was fossilized is unknown.
        self._fossilized_parameters = int(state.get("fossilized_parameters", 0))
        self._last_end_step = state["last_end_step"]
        adaptations = [Adaptation.from_json(a) for a in state["active"]]
        self._embargo_until = {k: int(v) for k, v in state["embargo_until"].items()}
        self._failed_pairs = {(s, k) for s, k in state["failed_pairs"]}
        self._broken_kernels = set(state.get("broken_kernels", []))  # absent before 2026-11
        self._notice = state["notice"]
        self._counters = {k: int(state["counters"][k]) for k in ("d", "c", "f")}
        self._rollbacks = max(rollbacks, int(state["rollbacks"]))
        self._quarantined = quarantined | set(state["quarantined"])
        self._rolled_back_kernels = rolled_back | set(state["rolled_back_kernels"])
        for a in adaptations:
            self._check_seed_id(a.seed_id)
        for a in adaptations:
            if a.seed_id not in self._quarantined:
                self._active[a.seed_id] = a
                self._recent.setdefault(a.seed_id, a)

    # --- what happened since the last step -----------------------------------------------

    def _reconcile(self, seen: SeedTable) -> None:
        boundary = self._steps - 1
        for stage in (S.CULLED, S.ROLLED_BACK):
            for row in seen.rows_in(stage):
                self._note_stage(seen.seed_id(row), stage, boundary_step=boundary)
        for sid in self.active_seeds:
            a, row = self._active[sid], seen.row(sid)
            if row is None:
                continue
            obs = seen.observation(row)
            if obs.stage.is_terminal:
                self._close(a, obs.stage, f"Kasmina reports the seed {obs.stage.value}",
                            boundary_step=boundary)
            elif obs.stage is S.DORMANT:
                if a.stage is None:
                    self._refused_germination(a, "the seed is still DORMANT at the next epoch end")
                else:
                    self._close(a, S.CULLED, f"the seed went back to DORMANT from "
                                f"{a.stage.value} without a reported outcome",
                                boundary_step=boundary)
            elif obs.stage is a.stage:
                a.epochs_in_stage += 1
            else:
                a.stage, a.epochs_in_stage = obs.stage, 1
                a.trained |= obs.stage is S.TRAINING
        # Commands answered: whatever was expected has happened or was overtaken.
        for a in self._active.values():
            a.expected = None

    def _note_stage(self, sid: str, stage: SeedLifecycle, *, boundary_step: int) -> None:
        """Track what Kasmina enforces by itself: the embargo after a cull, the lock after a
        rollback. `boundary_step`: the step whose boundary made the seed enter `stage`."""
        if stage is S.CULLED:
            layer = self.layers[seed_key(sid)[0]]
            until = boundary_step + layer.embargo_epochs
            self._embargo_until[sid] = max(self._embargo_until.get(sid, 0), until)
        elif stage is S.ROLLED_BACK:
            self._quarantined.add(sid)

    def _close(self, a: Adaptation, outcome: SeedLifecycle, kasmina_reason: str, *,
               boundary_step: int) -> None:
        """An adaptation ended at the boundary after step `boundary_step`: report it with the
        metrics of that step, and Tamiyo's reason if it was Tamiyo's command."""
        del self._active[a.seed_id]
        if self._recent.get(a.seed_id) is a:
            del self._recent[a.seed_id]
        commanded = a.expected is outcome and a.expected_reason
        reason = a.expected_reason if commanded else kasmina_reason
        if outcome in _FAILED:
            self._failed_pairs.add((a.seed_id, a.kernel_artifact_id))
            if kasmina_reason.startswith((RUNTIME_ERROR, LOAD_FAILED)):  # not tried again
                self._broken_kernels.add(a.kernel_artifact_id)
        if outcome is S.ROLLED_BACK:
            self._quarantined.add(a.seed_id)
            self._rolled_back_kernels.add(a.kernel_artifact_id)
        if outcome is S.FOSSILIZED:  # kept for good: its parameters stay spent
            self._fossilized_parameters += a.parameters or 0
        self._last_end_step = boundary_step
        self._report(a, outcome, reason, self._metrics)

    def _refused(self, command: KasminaControlCommand, why: str) -> None:
        sid = f"{command.target_layer_id}:{command.target_seed_id}"
        a = self._active.get(sid)
        if (command.command is KasminaCommandType.REQUEST_GERMINATION and a is not None
                and a.stage is None and a.kernel_artifact_id == command.kernel_artifact_id):
            self._refused_germination(a, f"Kasmina refused it: {why}")
            return
        self._decisions.append(self._decision(
            "wait", f"Kasmina refused command {command.command_id} ({command.command.value}"
            f"{' to ' + command.target_stage.value if command.target_stage else ''}) for seed "
            f"{sid}: {why}. The next epoch end decides from the seed's actual stage.", seed=sid))

    def _refused_germination(self, a: Adaptation, why: str) -> None:
        """The germination never happened: no outcome to report, the budget (the germination and
        its parameters) is given back, and the seed waits out a full embargo (it may be under
        one Tamiyo did not see)."""
        del self._active[a.seed_id]
        self._germinations -= 1
        until = self._steps + self.layers[seed_key(a.seed_id)[0]].embargo_epochs
        self._embargo_until[a.seed_id] = max(self._embargo_until.get(a.seed_id, 0), until)
        self._decisions.append(self._decision(
            "wait", f"The germination of seed {a.seed_id} with kernel {a.kernel_artifact_id} did "
            f"not happen: {why}. The seed is left alone for an embargo period.",
            seed=a.seed_id, kernel=a.kernel_artifact_id))

    # --- divergence ----------------------------------------------------------------------

    def _divergence(self, packet: SystemStatePacket) -> str | None:
        for name in ("train_loss", "validation_loss", "validation_accuracy"):
            value = getattr(packet, name)
            if value is not None and not math.isfinite(value):
                return f"non-finite {name} ({value}) at epoch {packet.current_epoch}"
        best, ratio = self._best_validation_loss, self.config.divergence.loss_ratio
        # A ratio of a loss that can reach zero or go negative says nothing: only above zero.
        if best is None or best <= 0 or packet.validation_loss <= ratio * best:
            return None
        reason = (f"validation_loss {packet.validation_loss:.6g} at epoch {packet.current_epoch} "
                  f"is above {ratio:g} x the best {best:.6g}")
        best_train = self._best_train_loss
        if packet.train_loss is None or best_train is None or best_train <= 0:
            return reason
        if packet.train_loss <= ratio * best_train:
            return None  # over-fitting (or noise near zero), not divergence
        return (f"{reason}, and train_loss {packet.train_loss:.6g} above {ratio:g} x its best "
                f"{best_train:.6g}")

    def _rollback_signal(self, reason: str) -> AdaptationSignal:
        blending = [a for a in self._active.values() if a.stage in BLENDING]
        suspect = max(blending, key=lambda a: (a.started_step, seed_key(a.seed_id)), default=None)
        self.rollback_suspect = suspect.seed_id if suspect else None
        if suspect is not None:
            blame = (f"Suspect: seed {suspect.seed_id} (kernel {suspect.kernel_artifact_id}, "
                     f"{suspect.stage.value}), the most recent graft that touches the forward "
                     "pass.")
        else:
            blame = "No graft touches the forward pass: no seed is blamed."
        self._decisions.append(self._decision(
            "rollback", f"Divergence: {reason}. Emergency rollback required. {blame}",
            seed=self.rollback_suspect,
            kernel=suspect.kernel_artifact_id if suspect else None,
            scores={k: v for k, v in (("best_validation_loss", self._best_validation_loss),
                                      ("loss_ratio", self.config.divergence.loss_ratio))
                    if v is not None}))
        return AdaptationSignal(optimizer_rebuild_required=False, emergency_rollback_required=True,
                                rollback_reason=reason)

    def _mark_quarantined(self, seen: SeedTable, out: _StepOutput) -> None:
        """A quarantined seed that Kasmina still runs (the checkpoint restored it mid-lifecycle
        and nothing marked it) is moved to ROLLED_BACK: it would otherwise grow unwatched."""
        for sid in sorted(self._quarantined, key=seed_key):
            row = seen.row(sid)
            if row is None:
                continue
            obs = seen.observation(row)
            if obs.stage is S.DORMANT or obs.stage.is_terminal:
                continue
            reason = "quarantined after a rollback"
            out.commands.append(self._command(KasminaCommandType.ADVANCE, sid, reason=reason,
                                              target=S.ROLLED_BACK))
            out.rebuild |= obs.stage in HOLDS_MODULE
            self._decisions.append(self._decision(
                "rollback", f"Seed {sid} is quarantined after a rollback but Kasmina still runs it "
                f"in {obs.stage.value}: mark it ROLLED_BACK.", seed=sid))

    # --- lifecycle gates -----------------------------------------------------------------

    def _apply_gate(self, a: Adaptation, obs: SeedObservation, out: _StepOutput) -> None:
        if a.stage is None:
            return
        gain = (improvement(self._metric, a.pre_metrics[self._metric], self._metrics[self._metric])
                if self._metric in a.pre_metrics else None)
        guard = self._guard
        blamed = guard is not None and a.seed_id in self._blamed
        verdict = gate(a.stage, obs.ready, a.epochs_in_stage, trained=a.trained, gain=gain,
                       metric=self._metric, gates=self.config.gates,
                       guard=(guard, guard.without[a.seed_id]) if blamed else None)
        if verdict.action is None:
            return
        where = f"Seed {a.seed_id} ({a.stage.value}, {a.epochs_in_stage} epoch end(s) there"
        where += ", ready)" if obs.ready else ", not ready)"
        scores = {"epochs_in_stage": float(a.epochs_in_stage), **verdict.scores}
        if verdict.action == "hold":
            self._decisions.append(self._decision(
                "wait", f"{where}: {verdict.reason}.", seed=a.seed_id,
                kernel=a.kernel_artifact_id, scores=scores))
            return
        kind, target, action = {
            "advance": (KasminaCommandType.ADVANCE, verdict.target, "advance"),
            "cull": (KasminaCommandType.CULL, S.CULLED, "cull"),
            "cancel": (KasminaCommandType.CANCEL_GERMINATION, S.CANCELLED, "cancel"),
        }[verdict.action]
        advance = kind is KasminaCommandType.ADVANCE
        command = self._command(kind, a.seed_id, reason=verdict.reason,
                                target=verdict.target if advance else None)
        out.commands.append(command)
        out.rebuild |= a.stage in HOLDS_MODULE or target in HOLDS_MODULE
        a.expected, a.expected_reason = target, verdict.reason
        text = f"{where}: {verdict.reason}; {action}"
        text += f" to {target.value}." if action == "advance" else "."
        self._decisions.append(self._decision(action, text, seed=a.seed_id,
                                              kernel=a.kernel_artifact_id, scores=scores))

    # --- germination ---------------------------------------------------------------------

    def _maybe_germinate(self, seen: SeedTable, out: _StepOutput) -> None:
        plateau_cfg = self.config.plateau
        if self._steps < plateau_cfg.warmup_epochs or self._plateau.stale < plateau_cfg.patience:
            return
        value = self._metrics[self._metric]
        plateau = (f"Plateau: {self._metric} {value:.6g} has not beaten its best "
                   f"{self._plateau.best:.6g} by more than min_delta={plateau_cfg.min_delta:g}"
                   + (f" + {plateau_cfg.min_delta_relative:g} x |best|" if plateau_cfg.min_delta_relative else "")
                   + (f" (or by under slowdown={plateau_cfg.slowdown:g} x its largest gain "
                      f"{self._plateau.largest_gain:.6g})" if plateau_cfg.slowdown else "")
                   + " for "
                   f"{self._plateau.stale} epoch(s) (patience {plateau_cfg.patience}).")
        if self._paused:
            why = f" ({self._pause_reason})" if self._pause_reason else ""
            self._say_once("paused", f"{plateau} Germination is paused{why}: no new adaptation.")
            return
        cap = self.config.max_germinations
        if cap is not None and self._germinations >= cap:
            self._say_once("budget", f"{plateau} All {cap} germination(s) of max_germinations are "
                                     "spent: no new adaptation.")
            return
        # Seeds growing that Tamiyo did not start (an operator's command) count too.
        growing = ~TERMINAL_CODES[seen.stage] & (seen.stage != S.DORMANT.code)
        rows = [seen.row(sid) for sid in self._active]
        busy = len(self._active) + int(growing.sum()) - sum(
            1 for row in rows if row is not None and growing[row])
        if busy >= self.config.max_concurrent:
            return
        cooldown = self.config.cooldown_epochs
        if self._last_end_step is not None and self._steps - self._last_end_step < cooldown:
            return
        free = seen.stage == S.DORMANT.code
        embargoed = [sid for sid, until in self._embargo_until.items() if until > self._steps]
        for sid in [*self._active, *self._quarantined, *embargoed]:
            row = seen.row(sid)
            if row is not None:
                free[row] = False
        candidates = np.flatnonzero(free)
        if not len(candidates):
            self._say_once("no_seed", f"{plateau} No dormant seed is free to germinate "
                           f"({len(embargoed)} under embargo, {len(self._quarantined)} "
                           "quarantined).")
            return
        held = None
        if self.config.location.spread:  # the grafts each layer holds: growing or fossilized
            holding = growing | (seen.stage == S.FOSSILIZED.code)
            held = np.bincount(seen.layer[holding], minlength=int(seen.layer.max()) + 1)
            held = held[seen.layer[candidates]]
        ranking = rank_bottlenecks(
            seen.gradient_energy[candidates], seen.activation_variance[candidates],
            seen.dead_ratio[candidates], seen.layer[candidates], seen.index[candidates],
            self.config.location, held=held)
        if self.config.location.strategy == "random":
            draw = np.random.default_rng([self.config.location.random_seed, self._germinations])
            ranking = replace(ranking, order=draw.permutation(len(candidates)))
        ordered = candidates[ranking.order]  # rows, strongest bottleneck first (or drawn)
        choice, why_not = self._choose(seen, ordered)
        if choice is None:
            detail = "; ".join(f"{iface}: {why}" for iface, why in sorted(why_not.items()))
            self._say_once(f"no_kernel:{detail}",
                           f"{plateau} No VALIDATED kernel fits any free seed, so training goes on "
                           f"without growing. {detail}.")
            return
        position, candidate, considered = choice
        self._germinate(seen, ranking, ordered, position, candidate, considered, why_not,
                        plateau, out)

    def _choose(self, seen: SeedTable, ordered: np.ndarray):
        """The strongest-ranked seed that a kernel fits, with that kernel: (its position in
        `ordered`, the kernel, every kernel that fit its interface), or None; and why the
        interfaces passed over have no usable kernel."""
        found_for: dict[int, list[KernelCandidate]] = {}
        why_not: dict[str, str] = {}
        queried: dict[str, tuple[list[KernelCandidate], str]] = {}
        for layer_id in np.unique(seen.layer[ordered]).tolist():
            face = self.layers[layer_id].interface
            if str(face) not in queried:
                queried[str(face)] = self._query(face)
            found_for[layer_id], why = queried[str(face)]
            if not found_for[layer_id]:
                why_not[str(face)] = why
        with_kernels = [layer_id for layer_id, found in found_for.items() if found]
        for position in np.flatnonzero(np.isin(seen.layer[ordered], with_kernels)).tolist():
            row = int(ordered[position])
            sid, found = seen.seed_id(row), found_for[int(seen.layer[row])]
            usable = [k for k in found
                      if (sid, k.kernel_artifact_id) not in self._failed_pairs
                      and k.kernel_artifact_id not in self._rolled_back_kernels
                      and k.kernel_artifact_id not in self._broken_kernels]
            if usable:
                return (position, usable[0], found), why_not
            face = str(self.layers[int(seen.layer[row])].interface)
            why_not.setdefault(face, "every fitting kernel failed at the free seeds, raised "
                                     "at run time or was rolled back")
        return None, why_not

    def _query(self, interface: KernelInterface) -> tuple[list[KernelCandidate], str]:
        """Kernels for `interface` within max_risk, best first, and why there are none."""
        kc = self.config.kernel
        if self.chooser is None:
            return [], "no kernel source (give TamiyoController urza= or kernel_chooser=)"
        query = KernelQuery(interface=interface, target=self.device_target, dtype=self.dtype,
                            required_tags=kc.require_tags, preferred_tags=kc.prefer_tags)
        try:
            found = self.chooser.candidates(query)
        except (EsperError, sqlite3.Error) as e:
            return [], f"the kernel query failed ({type(e).__name__}: {e})"
        within = [k for k in found if k.risk_score is None or k.risk_score <= kc.max_risk]
        if within and kc.max_parameters is not None:
            small = [k for k in within if k.parameters is not None and k.parameters <= kc.max_parameters]
            if not small:
                return [], (f"{len(within)} VALIDATED kernel(s) within max_risk, none with a measured "
                            f"parameter count at most max_parameters={kc.max_parameters}")
            within = small
        left = self._parameters_left()
        if within and left is not None:
            fit = [k for k in within if k.parameters is not None and k.parameters <= left]
            if not fit:
                capped = " and max_parameters" if kc.max_parameters is not None else ""
                return [], (f"{len(within)} VALIDATED kernel(s) within max_risk{capped}, none "
                            f"with a measured parameter count within the {left} parameter(s) "
                            f"left of max_added_parameters={self.config.max_added_parameters}")
            within = fit
        if within:
            if kc.rank == "capacity":  # stable: the chooser's order (tags, latency) breaks ties
                preferred = set(kc.prefer_tags)
                within.sort(key=lambda k: (-len(preferred & set(k.tags)), -(k.parameters or 0)))
            return within, ""
        if found:
            return [], f"{len(found)} VALIDATED kernel(s), all above max_risk={kc.max_risk:g}"
        tags = f" with tags {', '.join(kc.require_tags)}" if kc.require_tags else ""
        return [], f"no VALIDATED kernel{tags} for {self.device_target}/{self.dtype}"

    def _parameters_left(self) -> int | None:
        """What the grafts the run holds leave of max_added_parameters (None: no budget): the
        adaptations under way and the fossilized ones count; those that ended otherwise do not."""
        budget = self.config.max_added_parameters
        if budget is None:
            return None
        held = sum(a.parameters or 0 for a in self._active.values())
        return max(0, budget - held - self._fossilized_parameters)

    def _germinate(self, seen: SeedTable, ranking: Ranking, ordered: np.ndarray, position: int,
                   candidate: KernelCandidate, considered: list[KernelCandidate],
                   why_not: dict[str, str], plateau: str, out: _StepOutput) -> None:
        kc = self.config.kernel
        location = LocationScore.of(ranking, int(ranking.order[position]),
                                    seen.observation(int(ordered[position])))
        sid = location.seed_id
        layer = self.layers[seed_key(sid)[0]]
        o = location.observation
        chosen = ("was drawn at random (location.strategy random); its bottleneck score is "
                  f"{location.score:.3f}" if self.config.location.strategy == "random" else
                  f"has the strongest bottleneck score {location.score:.3f}")
        where = (f"Location: seed {sid} (layer {layer.name or layer.layer_id}, interface "
                 f"{layer.interface}) {chosen} of "
                 f"{len(ordered)} free dormant seed(s): gradient energy {o.gradient_energy:.4g} "
                 f"(rank {location.gradient_energy_rank:.2f}), activation variance "
                 f"{o.activation_variance:.4g} (low-variance rank "
                 f"{location.low_variance_rank:.2f}), dead ratio {o.dead_ratio:.3f} (rank "
                 f"{location.dead_ratio_rank:.2f})")
        if len(ordered) > 1:
            other = 1 if position == 0 else 0
            where += (f"; runner-up {seen.seed_id(int(ordered[other]))} at "
                      f"{float(ranking.score[ranking.order[other]]):.3f}")
        if position:
            passed = [seen.seed_id(int(row)) for row in ordered[:min(position, 5)]]
            more = f" and {position - 5} more" if position > 5 else ""
            reasons = "; ".join(f"{face}: {why}" for face, why in sorted(why_not.items()))
            where += (f"; passed over stronger seed(s) {', '.join(passed)}{more}, with no usable "
                      f"kernel ({reasons})")
        preferred = sorted(set(kc.prefer_tags) & set(candidate.tags))
        shown = ", ".join(k.kernel_artifact_id for k in considered[:5])
        shown += ", ..." if len(considered) > 5 else ""
        risk = "unknown" if candidate.risk_score is None else f"{candidate.risk_score:.3f}"
        latency = "" if candidate.latency_ms is None else f", latency {candidate.latency_ms:.4g} ms"
        latency += "" if candidate.parameters is None else f", {candidate.parameters} parameters"
        ranked = "most parameters, then latency" if kc.rank == "capacity" else "then latency"
        kernel = (f"Kernel: KernelQuery(interface {layer.interface}, target {self.device_target}, "
                  f"dtype {self.dtype}, require [{', '.join(kc.require_tags)}], prefer "
                  f"[{', '.join(kc.prefer_tags)}], max_risk {kc.max_risk:g}) gave "
                  f"{len(considered)} candidate(s) ({shown}); chose "
                  f"{candidate.kernel_artifact_id} "
                  f"(blueprint {candidate.blueprint_id[:12]}, risk {risk}, tags "
                  f"[{', '.join(candidate.tags)}]{latency}): the best ranked (preferred tags "
                  f"{len(preferred)}, {ranked}) that has not failed here.")
        left = self._parameters_left()
        if left is not None and candidate.parameters is not None:
            kernel += (f" Budget: {candidate.parameters} of the {left} parameter(s) left of "
                       f"max_added_parameters={self.config.max_added_parameters}, "
                       f"{left - candidate.parameters} left after it.")
        note = ""
        if self.chooser is not None:
            try:
                self.chooser.note_choice(candidate)
            except (EsperError, sqlite3.Error) as e:
                note = f" (tamiyo_interest not updated: {type(e).__name__}: {e})"
        a = Adaptation(seed_id=sid, kernel_artifact_id=candidate.kernel_artifact_id,
                       blueprint_id=candidate.blueprint_id, risk_score=candidate.risk_score,
                       tags=list(candidate.tags), started_step=self._steps,
                       started_epoch=self._epoch, pre_metrics=dict(self._metrics),
                       parameters=candidate.parameters, expected=S.GERMINATED)
        self._active[sid] = a
        self._recent[sid] = a
        self._germinations += 1
        stale, self._plateau.stale = self._plateau.stale, 0
        self._notice = None
        out.commands.append(self._command(
            KasminaCommandType.REQUEST_GERMINATION, sid, kernel=candidate.kernel_artifact_id,
            reason=f"plateau on {self._metric}; bottleneck score {location.score:.3f}",
            tags=sorted(set(kc.require_tags) | set(preferred))))
        scores = {**location.scores(), self._metric: self._metrics[self._metric],
                  "epochs_without_improvement": float(stale),
                  "candidates": float(len(considered))}
        if candidate.risk_score is not None:
            scores["risk_score"] = candidate.risk_score
        self._decisions.append(self._decision(
            "germinate", f"{plateau} {where}. {kernel}{note}", seed=sid,
            kernel=candidate.kernel_artifact_id, scores=scores))

    def _say_once(self, key: str, text: str) -> None:
        """A 'wait' decision for why nothing germinates, unless the same was said last."""
        if self._notice == key:
            return
        self._notice = key
        self._decisions.append(self._decision("wait", text))

    # --- records -------------------------------------------------------------------------

    def _prefix(self) -> str:
        return f"tamiyo-{self.run_id}" if self.run_id else "tamiyo"

    def _next_id(self, kind: str) -> str:
        self._counters[kind] += 1
        return f"{self._prefix()}-r{self._rollbacks}-{kind}{self._counters[kind]}"

    def _decision(self, action: str, explanation: str, *, seed: str | None = None,
                  kernel: str | None = None, scores: dict[str, float] | None = None,
                  decision_id: str | None = None, epoch: int | None = None) -> TamiyoDecision:
        return TamiyoDecision(
            decision_id=decision_id or self._next_id("d"), run_id=self.run_id,
            epoch=self._epoch if epoch is None else epoch, action=action, seed_id=seed,
            kernel_artifact_id=kernel, policy="heuristic", explanation=explanation,
            scores={k: float(v) for k, v in sorted((scores or {}).items()) if math.isfinite(v)})

    def _command(self, kind: KasminaCommandType, sid: str, *, reason: str,
                 kernel: str | None = None, target: SeedLifecycle | None = None,
                 tags: list[str] | None = None) -> KasminaControlCommand:
        layer_id, index = seed_key(sid)
        return KasminaControlCommand(
            command_id=self._next_id("c"), run_id=self.run_id, target_layer_id=layer_id,
            target_seed_id=index, command=kind, kernel_artifact_id=kernel, target_stage=target,
            grafting_strategy=self.config.kernel.grafting_strategy, selected_for_tags=tags,
            reason=reason)

    def _report(self, a: Adaptation, outcome: SeedLifecycle, reason: str,
                metrics: Mapping[str, float], *, report_id: str | None = None,
                epoch: int | None = None) -> None:
        epoch = self._epoch if epoch is None else epoch
        pre = a.pre_metrics.get(self._metric, math.nan)
        post = metrics.get(self._metric, pre)
        eval_metrics = {f"{k}_at_germination": v for k, v in a.pre_metrics.items()}
        eval_metrics |= {f"{k}_at_outcome": v for k, v in metrics.items()}
        eval_metrics["epochs"] = float(epoch - a.started_epoch)
        if math.isfinite(pre) and math.isfinite(post):
            eval_metrics["metric_gain"] = improvement(self._metric, pre, post)
        if a.risk_score is not None:
            eval_metrics["risk_score"] = a.risk_score
        self._reports.append(FieldReport(
            report_id=report_id or self._next_id("f"), run_id=self.run_id,
            blueprint_id=a.blueprint_id, kernel_artifact_id=a.kernel_artifact_id,
            seed_id=a.seed_id, pre_metric=pre, post_metric=post, outcome=outcome,
            reason=reason, epoch=epoch,
            eval_metrics={k: float(v) for k, v in sorted(eval_metrics.items())
                          if math.isfinite(v)}))

    # --- checks --------------------------------------------------------------------------

    def _check_seed_id(self, sid: str) -> None:
        try:
            layer_id, index = seed_key(sid)
        except ValueError:
            raise BadInputError(f"not a seed id (layer:index): {sid!r}") from None
        layer = self.layers.get(layer_id)
        if layer is None or not 0 <= index < layer.seeds:
            raise BadInputError(f"seed {sid} is not a seed of this model")

    def _check_seeds(self, seen: SeedTable) -> None:
        for layer_id, count in seen.counts.items():
            layer = self.layers.get(layer_id)
            if layer is None:
                raise BadInputError(f"seed {layer_id}:0 is not a seed of this model")
            if count != layer.seeds:
                raise BadInputError(f"layer {layer_id} reports {count} seeds; the model's layer "
                                    f"has {layer.seeds}")


def _finite_metrics(packet: SystemStatePacket) -> dict[str, float]:
    values = {"validation_loss": packet.validation_loss, "train_loss": packet.train_loss,
              "validation_accuracy": packet.validation_accuracy}
    return {k: float(v) for k, v in sorted(values.items()) if v is not None and math.isfinite(v)}
