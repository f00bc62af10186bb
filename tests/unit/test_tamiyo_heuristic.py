"""The heuristic Tamiyo: plateau, location, kernel choice, gates, embargo, divergence, pause,
checkpoints and determinism.

Seeds live in real KasminaLayers: commands go through `kasmina.dispatch` and
`kasmina.on_epoch_end`, which apply the lifecycle table and the embargo. What a test controls is
what Tolaria would measure: the validation loss, and each seed's readiness and chunk statistics
(written over the layer's real HealthSignal), so that every gate can be reached on purpose.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import kasmina
from esper.blueprints import standard_library
from esper.contracts import (
    LATENCY_MS,
    MEMORY_MB,
    CompilationPipeline,
    CompiledKernelArtifact,
    GuardReading,
    HealthSignal,
    KasminaCommandType,
    KasminaControlCommand,
    KernelInterface,
    LayerKind,
    TamiyoDecision,
    UrabraskValidationReport,
)
from esper.contracts import SeedLifecycle as S
from esper.errors import BadInputError
from esper.signing import sign
from esper.tamiyo import (
    FixedKernelChooser,
    KernelCandidate,
    TamiyoConfig,
    TamiyoController,
    build_state_packet,
)
from esper.tamiyo.config import GateConfig, LocationConfig
from esper.tamiyo.heuristic import Plateau, gate, rank_locations
from esper.tamiyo.packets import SeedObservation
from esper.urza import Urza

BASE = {"plateau": {"patience": 2, "min_delta": 0.01, "warmup_epochs": 2}}


def config(**sections) -> TamiyoConfig:
    data = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return TamiyoConfig.from_mapping(data)


def library_ir(name: str):
    return next(ir for ir in standard_library() if ir.name == name)


class Harness:
    """A wrapped two-layer model (layer 0: linear:8:4 seeds, layer 1: linear:8:2 seeds, two
    seeds each), its kernels, and the controller, stepped one epoch end at a time."""

    def __init__(self, tamiyo_config: TamiyoConfig | None = None, *, kernels=("mlp_gelu_w32",),
                 kasmina_config: dict | None = None, chooser=None, urza=None, observe=True,
                 model: nn.Module | None = None):
        torch.manual_seed(0)
        model = model or nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.source = kasmina.BlueprintKernelSource()
        kcfg = {"seeds_per_layer": 2, "embargo_epochs": 3, **(kasmina_config or {})}
        self.model, report = kasmina.wrap(model, kcfg, kernel_source=self.source)
        self.kernels: dict[str, list[str]] = {}
        for wrapped in report.layers:
            for name in kernels:
                kernel = self.source.add(library_ir(name), wrapped.interface)
                self.kernels.setdefault(str(wrapped.interface), []).append(kernel)
        if chooser is None and urza is None:
            chooser = FixedKernelChooser.from_entries(self.source.entries)
        self.tamiyo = TamiyoController(self.model, tamiyo_config or config(), urza=urza,
                                       kernel_chooser=chooser, run_id="run")
        self.observe = observe
        self.epoch = 0
        self.hold: set[str] = set()   # seeds that do not report readiness
        self.guard: GuardReading | None = None  # the packet's guarded task
        self.stats: dict[str, dict[str, float]] = {}
        self.rejected: list[tuple[KasminaControlCommand, str]] = []
        self.decisions: list[TamiyoDecision] = []
        self.reports = []
        self.dispatch = True

    @property
    def layers(self):
        return kasmina.layers(self.model)

    def stage(self, sid: str) -> S:
        layer, index = map(int, sid.split(":"))
        return self.layers[layer].stage(index)

    def health(self) -> list[HealthSignal]:
        signals = []
        for layer in self.layers:
            signal = layer.health_signal("run", self.epoch)
            ids = [f"{layer.layer_id}:{i}" for i in range(layer.seeds)]
            stat = {key: [self.stats.get(sid, {}).get(key, 0.0) for sid in ids]
                    for key in ("gradient_energy", "activation_variance", "dead_ratio")}
            signals.append(signal.model_copy(update={
                **stat, "is_ready_for_transition": [sid not in self.hold for sid in ids]}))
        return signals

    def packet(self, loss: float, **metrics):
        return build_state_packet("run", self.epoch, self.health(), validation_loss=loss, **metrics)

    def end_epoch(self, loss: float, **metrics):
        """One epoch end: Tamiyo decides, Kasmina applies the commands at the boundary."""
        self.epoch += 1
        health = self.health()
        packet = build_state_packet("run", self.epoch, health, validation_loss=loss,
                                    guard=self.guard, **metrics)
        signal = self.tamiyo.step(packet, health)
        if not signal.emergency_rollback_required:
            if self.dispatch:
                kasmina.dispatch(self.model, signal.commands)
            boundary = kasmina.on_epoch_end(self.model, self.epoch, "run")
            for layer in self.layers:
                layer.wait_for_loads()
            self.rejected += [r for report in boundary for r in report.rejected]
            if self.observe:
                self.tamiyo.observe_boundary(boundary)
        self.decisions += self.tamiyo.drain_decisions()
        self.reports += self.tamiyo.drain_field_reports()
        return signal

    def run(self, losses, **metrics):
        return [self.end_epoch(loss, **metrics) for loss in losses]

    def actions(self):
        return [(d.epoch, d.action, d.seed_id) for d in self.decisions]


def commands(signal):
    return [(c.command, f"{c.target_layer_id}:{c.target_seed_id}", c.target_stage)
            for c in signal.commands]


# Plateau ------------------------------------------------------------------------------------

def test_plateau_counts_epochs_without_an_improvement_above_min_delta():
    p = Plateau()
    assert p.update(1.0, lower_is_better=True, min_delta=0.1) and p.stale == 0
    assert not p.update(0.95, lower_is_better=True, min_delta=0.1)
    assert (p.best, p.stale) == (1.0, 1)  # 0.05 better: not enough, and not the new best
    assert not p.update(1.2, lower_is_better=True, min_delta=0.1) and p.stale == 2
    assert p.update(0.85, lower_is_better=True, min_delta=0.1) and (p.best, p.stale) == (0.85, 0)
    acc = Plateau()
    acc.update(0.5, lower_is_better=False, min_delta=0.01)
    assert acc.update(0.6, lower_is_better=False, min_delta=0.01)
    assert not acc.update(0.4, lower_is_better=False, min_delta=0.01) and acc.stale == 1


def test_germination_waits_for_warmup_and_patience():
    h = Harness(config(plateau={"patience": 2, "warmup_epochs": 5}))
    signals = h.run([1.0, 0.5, 0.498, 0.497])  # improving, then two stale epochs
    assert all(not s.commands for s in signals) and h.decisions == []  # warm-up: 4 < 5
    signal = h.end_epoch(0.496)
    assert [c.command for c in signal.commands] == [KasminaCommandType.REQUEST_GERMINATION]
    (decision,) = h.decisions
    assert decision.action == "germinate" and decision.epoch == 5
    assert "has not beaten its best 0.5 by more than min_delta=0.01 for 3 epoch(s)" in \
        decision.explanation

    steady = Harness(config(plateau={"patience": 2, "warmup_epochs": 0}))
    steady.run([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])  # always improving: never a plateau
    assert steady.decisions == []


def test_accuracy_plateau_and_a_missing_metric():
    h = Harness(config(plateau={"metric": "validation_accuracy"}))
    h.run([1.0, 0.8, 0.6], validation_accuracy=0.5)  # the loss improves, the accuracy does not
    assert h.actions() == [(3, "germinate", "0:0")]
    rising = Harness(config(plateau={"metric": "validation_accuracy"}))
    for epoch in range(6):
        rising.end_epoch(1.0, validation_accuracy=0.1 * epoch)
    assert rising.decisions == []
    with pytest.raises(BadInputError, match="validation_accuracy .* carries none"):
        Harness(config(plateau={"metric": "validation_accuracy"})).end_epoch(1.0)


# Location -----------------------------------------------------------------------------------

def test_rank_locations_scores_normalised_ranks_and_breaks_ties_by_seed_id():
    obs = [SeedObservation("0:0", S.DORMANT, False, gradient_energy=1.0, activation_variance=1.0),
           SeedObservation("0:1", S.DORMANT, False, gradient_energy=9.0, activation_variance=1.0),
           SeedObservation("1:0", S.DORMANT, False, gradient_energy=1.0, activation_variance=0.1,
                           dead_ratio=0.5),
           SeedObservation("1:1", S.DORMANT, False, gradient_energy=5.0, activation_variance=2.0)]
    ranked = rank_locations(obs, LocationConfig())
    by_id = {r.seed_id: r for r in ranked}
    # energy ranks: 1.0 (x2) share (0+1)/2/3, 5.0 -> 2/3, 9.0 -> 1.
    assert by_id["0:1"].gradient_energy_rank == 1.0
    assert by_id["0:0"].gradient_energy_rank == by_id["1:0"].gradient_energy_rank == 1 / 6
    assert by_id["1:0"].low_variance_rank == 1.0 and by_id["1:1"].low_variance_rank == 0.0
    assert by_id["1:0"].dead_ratio_rank == 1.0
    # 0:1: 1 + 0.5 * 0.5 + 0.5 * 1/3; 1:0: 1/6 + 0.5 + 0.5; 1:1: 2/3 + 0 + 0.5 * 1/3.
    assert [r.seed_id for r in ranked] == ["0:1", "1:0", "1:1", "0:0"]
    assert math.isclose(by_id["0:1"].score, 1 + 0.25 + 1 / 6)
    only_dead = rank_locations(obs, LocationConfig(gradient_energy_weight=0.0,
                                                   variance_weight=0.0))
    assert only_dead[0].seed_id == "1:0"
    same = [SeedObservation(sid, S.DORMANT, False) for sid in ("10:0", "2:1", "2:0")]
    assert [r.seed_id for r in rank_locations(same, LocationConfig())] == ["2:0", "2:1", "10:0"]


def test_a_chunk_that_outputs_nothing_ranks_on_its_gradient_alone():
    # Spans before their graft output zeros: variance 0, every unit "dead". They must not
    # outrank a layer on that; a layer's variance and dead ranks come from the layers alone.
    span = {"activation_variance": 0.0, "dead_ratio": 1.0}
    obs = [SeedObservation("0:0", S.DORMANT, False, gradient_energy=4.0, activation_variance=0.5),
           SeedObservation("1:0", S.DORMANT, False, gradient_energy=2.0, activation_variance=0.1),
           SeedObservation("2:0", S.DORMANT, False, gradient_energy=3.0, **span),
           SeedObservation("3:0", S.DORMANT, False, gradient_energy=8.0, **span)]
    ranked = rank_locations(obs, LocationConfig())
    by_id = {r.seed_id: r for r in ranked}
    # energy ranks 2 -> 0, 3 -> 1/3, 4 -> 2/3, 8 -> 1; the layers' variance ranks 0 and 1 and
    # dead ranks 1/2 (a tie) among themselves; each span's three ranks are its energy's.
    assert by_id["2:0"].low_variance_rank == by_id["2:0"].dead_ratio_rank == 1 / 3
    assert by_id["3:0"].low_variance_rank == by_id["3:0"].dead_ratio_rank == 1.0
    assert (by_id["0:0"].low_variance_rank, by_id["1:0"].low_variance_rank) == (0.0, 1.0)
    assert by_id["0:0"].dead_ratio_rank == by_id["1:0"].dead_ratio_rank == 0.5
    assert math.isclose(by_id["2:0"].score, 2 / 3) and math.isclose(by_id["0:0"].score, 2 / 3 + 0.25)
    assert [r.seed_id for r in ranked] == ["3:0", "0:0", "1:0", "2:0"]
    # Read as an ordinary chunk (a hair of variance), the same span would have beaten both
    # layers on its zeros: 1/2 + 1/2 + 1/2 against 1 + 0 + 1/8.
    quiet = [*obs[:2], replace(obs[2], activation_variance=1e-12)]
    assert rank_locations(quiet, LocationConfig())[0].seed_id == "2:0"


def test_the_strongest_bottleneck_is_germinated_with_its_layers_kernel():
    h = Harness()
    h.stats = {"1:1": {"gradient_energy": 3.0, "dead_ratio": 0.4},
               "0:0": {"gradient_energy": 1.0}}
    signal = h.run([1.0, 1.0, 1.0])[-1]
    (command,) = signal.commands
    assert (command.target_layer_id, command.target_seed_id) == (1, 1)
    assert command.kernel_artifact_id == h.kernels["linear:8:2"][0]
    (decision,) = h.decisions
    assert decision.seed_id == "1:1" and decision.kernel_artifact_id == command.kernel_artifact_id
    assert "seed 1:1 (layer 2, interface linear:8:2) has the strongest bottleneck score" in \
        decision.explanation
    assert "runner-up 0:0" in decision.explanation
    assert decision.scores["gradient_energy"] == 3.0 and decision.scores["dead_ratio_rank"] == 1.0
    assert h.stage("1:1") is S.GERMINATED


def test_spread_takes_the_strongest_seed_of_the_layer_that_holds_the_fewest_grafts():
    stats = {"1:1": {"gradient_energy": 3.0, "dead_ratio": 0.4}, "1:0": {"gradient_energy": 2.0},
             "0:0": {"gradient_energy": 1.0}, "0:1": {"gradient_energy": 0.5}}
    chosen = {}
    for spread in (False, True):
        h = Harness(config(max_concurrent=2, location={"spread": spread}))
        h.stats = stats
        h.run([1.0] * 8)  # plateaus: a germination, then a second while the first grows
        chosen[spread] = [d.seed_id for d in h.decisions if d.action == "germinate"][:2]
    assert chosen[False] == ["1:1", "1:0"]  # the ranking alone: both in layer 1
    assert chosen[True] == ["1:1", "0:0"]   # layer 1 holds a graft: layer 0's strongest next


def test_plateau_threshold_can_be_relative_to_the_best():
    p = Plateau()
    p.update(2.0, lower_is_better=True, min_delta=0.0, min_delta_relative=0.05)
    assert not p.update(1.95, lower_is_better=True, min_delta=0.0, min_delta_relative=0.05)
    assert p.stale == 1  # 2.5% better: under 5% of 2.0
    assert p.update(1.85, lower_is_better=True, min_delta=0.0, min_delta_relative=0.05)
    h = Harness(config(plateau={"min_delta": 0.0, "min_delta_relative": 0.1, "warmup_epochs": 0,
                                "patience": 1}))
    h.run([1.0, 0.8, 0.75])  # 20% better, then 6%: a plateau at the third epoch
    (decision,) = [d for d in h.decisions if d.action == "germinate"]
    assert decision.epoch == 3
    assert "by more than min_delta=0 + 0.1 x |best| for 1 epoch(s)" in decision.explanation


def test_plateau_slowdown_counts_slow_gains_as_stale():
    p = Plateau()
    p.update(2.0, lower_is_better=True, min_delta=0.0, slowdown=0.25)
    assert p.update(1.0, lower_is_better=True, min_delta=0.0, slowdown=0.25)  # gain 1.0, the largest
    assert p.update(0.7, lower_is_better=True, min_delta=0.0, slowdown=0.25)  # 0.3: over a quarter
    assert not p.update(0.6, lower_is_better=True, min_delta=0.0, slowdown=0.25)
    assert (p.best, p.stale, p.largest_gain) == (0.6, 1, 1.0)  # a new best, but slow
    assert Plateau.from_json(p.to_json()) == p
    assert Plateau.from_json({"best": 0.6, "stale": 1}).largest_gain == 0.0  # a state from before
    h = Harness(config(plateau={"min_delta": 0.0, "slowdown": 0.25, "warmup_epochs": 0, "patience": 1}))
    h.run([2.0, 1.0, 0.7, 0.6])
    (decision,) = [d for d in h.decisions if d.action == "germinate"]
    assert decision.epoch == 4
    assert "(or by under slowdown=0.25 x its largest gain 1)" in decision.explanation


def test_random_placement_draws_free_seeds_reproducibly_and_says_so():
    def drawn(random_seed: int) -> list[str]:
        h = Harness(config(location={"strategy": "random", "random_seed": random_seed},
                           gates={"max_loading_epochs": 50}, max_concurrent=4))
        h.hold = {"0:0", "0:1", "1:0", "1:1"}  # nobody advances: every germination stays active
        h.stats = {"1:1": {"gradient_energy": 3.0, "dead_ratio": 0.4}}  # the bottleneck arm's pick
        h.run([1.0] * 9)
        chosen = [d for d in h.decisions if d.action == "germinate"]
        assert all("was drawn at random (location.strategy random)" in d.explanation
                   for d in chosen)
        return [d.seed_id for d in chosen]

    runs = {s: drawn(s) for s in range(6)}
    assert runs[0] == drawn(0)  # the same random_seed draws the same seeds
    for seeds in runs.values():
        assert sorted(seeds) == ["0:0", "0:1", "1:0", "1:1"]  # each free seed once
    assert len({tuple(seeds) for seeds in runs.values()}) > 1  # and not in one fixed order
    assert {seeds[0] for seeds in runs.values()} != {"1:1"}  # ignoring the bottleneck score


def test_equal_seeds_are_chosen_in_seed_id_order():
    h = Harness()
    h.run([1.0, 1.0, 1.0])
    assert h.decisions[0].seed_id == "0:0"


# Concurrency --------------------------------------------------------------------------------

def test_at_most_max_concurrent_adaptations():
    h = Harness(config(gates={"max_training_epochs": 50}))
    h.hold = {"0:0", "0:1", "1:0", "1:1"}
    h.stats = {"0:0": {"gradient_energy": 2.0}}
    h.run([1.0] * 3)              # 0:0 germinates at 3
    h.hold -= {"0:0"}
    h.run([1.0] * 2)              # to LOADING at 4, TRAINING from the boundary of 5...
    h.hold |= {"0:0"}
    h.run([1.0] * 8)              # ...where it stays: the plateau goes on, nothing else grows
    assert [a for _, a, _ in h.actions()] == ["germinate", "advance"]
    assert h.tamiyo.active_seeds == ["0:0"] and h.stage("0:0") is S.TRAINING

    two = Harness(config(max_concurrent=2, gates={"max_loading_epochs": 50}))
    two.hold = {"0:0", "0:1", "1:0", "1:1"}
    two.run([1.0] * 8)
    germinated = [(e, sid) for e, a, sid in two.actions() if a == "germinate"]
    # A new plateau (patience epochs) is needed after each germination.
    assert germinated == [(3, "0:0"), (5, "0:1")]
    assert two.tamiyo.active_seeds == ["0:0", "0:1"]


def test_max_germinations_and_cooldown():
    h = Harness(config(max_germinations=1))
    h.run([1.0] * 3)
    h.run([0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5])  # through the lifecycle: kept
    assert h.tamiyo.active_seeds == [] and h.reports[0].outcome is S.FOSSILIZED
    h.run([0.5] * 6)
    assert [a for _, a, _ in h.actions()].count("germinate") == 1
    assert "All 1 germination(s) of max_germinations are spent" in h.decisions[-1].explanation

    cool = Harness(config(cooldown_epochs=4))
    cool.run([1.0] * 3)
    cool.run([0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5])
    end = cool.reports[0].epoch
    cool.run([0.5] * 6)
    second = [e for e, a, _ in cool.actions() if a == "germinate"][1]
    assert second == end + 4


# Gates --------------------------------------------------------------------------------------

def test_a_graft_that_helps_is_kept_and_fossilized():
    h = Harness()
    signals = h.run([1.0, 1.0, 1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45])
    flow = [commands(s) for s in signals]
    seed = "0:0"
    assert flow[2] == [(KasminaCommandType.REQUEST_GERMINATION, seed, None)]
    assert flow[3] == [(KasminaCommandType.ADVANCE, seed, S.LOADING)]
    assert flow[4] == []  # LOADING -> TRAINING is Kasmina's own move
    assert [f[0][2] for f in flow[5:10]] == [S.GRAFTING, S.STABILIZATION, S.EVALUATING,
                                             S.FINE_TUNING, S.FOSSILIZED]
    assert h.stage(seed) is S.FOSSILIZED and h.rejected == []
    # Parameters are created or moved at the boundaries of LOADING, TRAINING->GRAFTING, ...
    assert [s.optimizer_rebuild_required for s in signals] == [
        False, False, False, False, True, True, True, True, True, True]
    keep = next(d for d in h.decisions if d.epoch == 9)
    assert keep.action == "advance" and "keep: validation_loss changed by +0.5" in keep.explanation
    assert keep.scores["metric_gain"] == 0.5
    (report,) = h.reports
    assert report.outcome is S.FOSSILIZED and report.seed_id == seed
    assert (report.pre_metric, report.post_metric, report.epoch) == (1.0, 0.45, 10)
    assert report.kernel_artifact_id == h.kernels["linear:8:4"][0]
    assert report.blueprint_id[:12] == report.kernel_artifact_id[:12]
    assert report.eval_metrics["metric_gain"] == pytest.approx(0.55)
    assert report.eval_metrics["epochs"] == 7
    assert h.tamiyo.active_seeds == []


def test_a_graft_that_hurts_is_culled_at_evaluation():
    h = Harness(config(gates={"cull_max_degradation": 0.05}))
    h.stats = {"0:0": {"gradient_energy": 1.0}}
    h.run([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    signal = h.end_epoch(1.2)  # at EVALUATING, ready: 0.2 worse than at germination
    assert commands(signal) == [(KasminaCommandType.CULL, "0:0", None)]
    cull = h.decisions[-1]
    assert cull.action == "cull" and "worse by more than cull_max_degradation=0.05" in \
        cull.explanation
    (report,) = h.reports
    assert report.outcome is S.CULLED and (report.pre_metric, report.post_metric) == (1.0, 1.2)
    assert report.reason.startswith("validation_loss changed by -0.2 since germination")
    assert report.reason in cull.explanation  # Tamiyo's reason, not Kasmina's
    assert h.stage("0:0") is S.CULLED


def test_an_inconclusive_evaluation_is_repeated_then_culled():
    h = Harness(config(gates={"keep_min_improvement": 0.5, "cull_max_degradation": 0.5,
                              "max_evaluation_epochs": 2}))
    h.run([1.0] * 8)
    first = h.end_epoch(0.9)  # EVALUATING, 1st epoch end there: +0.1, between the thresholds
    assert first.commands == [] and h.decisions[-1].action == "wait"
    assert "inconclusive" in h.decisions[-1].explanation
    second = h.end_epoch(0.9)
    assert commands(second) == [(KasminaCommandType.CULL, "0:0", None)]
    assert "inconclusive after 2 epoch(s) in EVALUATING" in h.decisions[-1].explanation


def test_gate_table_for_fixed_function_kernels_and_fine_tuning():
    gates = GateConfig(cull_max_degradation=0.1)
    kept = gate(S.EVALUATING, True, 1, trained=False, gain=0.0, metric="validation_loss",
                gates=gates)
    assert (kept.action, kept.target) == ("advance", S.FOSSILIZED)
    assert "fixed-function kernel skips FINE_TUNING" in kept.reason
    assert gate(S.EVALUATING, False, 1, trained=True, gain=-5.0, metric="validation_loss",
                gates=gates).action is None  # not ready: no judgement yet
    worse = gate(S.FINE_TUNING, True, 1, trained=True, gain=-0.2, metric="validation_loss",
                 gates=gates)
    assert worse.action == "cull"
    done = gate(S.FINE_TUNING, True, 1, trained=True, gain=-0.05, metric="validation_loss",
                gates=gates)
    assert (done.action, done.target) == ("advance", S.FOSSILIZED)
    stuck = gate(S.GERMINATED, False, 5, trained=False, gain=0.0, metric="validation_loss",
                 gates=GateConfig(max_loading_epochs=5))
    assert stuck.action == "cancel"
    assert gate(S.GRAFTING, False, 999, trained=True, gain=0.0, metric="validation_loss",
                gates=GateConfig()).action is None  # no grafting limit by default
    assert gate(S.GRAFTING, False, 4, trained=True, gain=0.0, metric="validation_loss",
                gates=GateConfig(max_grafting_epochs=4)).action == "cull"


def test_the_guard_culls_a_graft_the_guarded_task_lost_to_and_only_that_one():
    gates = GateConfig(guard_max_degradation=0.05)
    kwargs = {"trained": True, "gain": 0.3, "metric": "validation_loss", "gates": gates}
    lost = GuardReading(metric="accuracy", reference=0.80, value=0.70)  # 12.5% worse than at start
    culled = gate(S.EVALUATING, True, 1, guard=(lost, 0.78), **kwargs)
    assert culled.action == "cull"
    assert "12.50% worse than 0.8 at the run's start" in culled.reason and "0.78 without" in culled.reason
    assert culled.scores["guard_without"] == 0.78
    assert gate(S.FINE_TUNING, True, 1, guard=(lost, 0.75), **kwargs).action == "cull"
    # Not this graft's doing (no better without it): the task's gate decides, here keep.
    assert gate(S.EVALUATING, True, 1, guard=(lost, 0.70), **kwargs).target is S.FINE_TUNING
    # Within the limit, better without it or not: kept.
    within = GuardReading(metric="accuracy", reference=0.80, value=0.77)
    assert gate(S.EVALUATING, True, 1, guard=(within, 0.80), **kwargs).target is S.FINE_TUNING
    # Ready or not, in any stage that blends before FOSSILIZED; never before blending.
    for stage in (S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING):
        assert gate(stage, False, 1, guard=(lost, 0.78), **kwargs).action == "cull"
    assert gate(S.TRAINING, False, 1, guard=(lost, 0.78), **kwargs).action is None
    # A regression's loss: higher is worse.
    loss = GuardReading(metric="loss", reference=1.0, value=1.2)
    assert gate(S.FINE_TUNING, True, 1, guard=(loss, 1.1), **kwargs).action == "cull"
    assert gate(S.FINE_TUNING, True, 1, guard=(loss, 1.3), **kwargs).target is S.FOSSILIZED
    assert loss.degradation() == pytest.approx(0.2) and lost.degradation(0.8) == 0.0


def test_the_guard_blames_the_fewest_grafts_that_make_up_the_excess():
    # 0.80 at the start, limit 5%: the edge is 0.76, so 0.70 is 0.06 short of it.
    reading = GuardReading(metric="accuracy", reference=0.80, value=0.70,
                           without={"0:0": 0.72, "0:1": 0.75, "1:0": 0.69, "1:1": 0.74, "2:0": 0.75})
    assert reading.blamed(0.05) == ["0:1", "2:0"]  # +0.05 each, ties by seed id: 0.10 >= 0.06
    assert reading.blamed(0.10) == ["0:1"]        # edge 0.72: +0.05 covers 0.02
    assert reading.blamed(0.15) == []             # 12.5% worse: within the limit
    short = reading.model_copy(update={"without": {"0:0": 0.71, "1:0": 0.69, "1:1": 0.72}})
    assert short.blamed(0.0) == ["1:1", "0:0"]    # never enough: every graft it reads better without
    loss = GuardReading(metric="loss", reference=1.0, value=1.5, without={"0:0": 1.2, "0:1": 1.4, "0:2": 1.6})
    assert loss.blamed(0.1) == ["0:0", "0:1"]     # edge 1.1: -0.3, then -0.1 covers 0.4


def test_the_controller_reads_the_guard_of_the_packet_for_the_seed_at_its_gate():
    h = Harness(config(gates={"guard_max_degradation": 0.05}))
    h.run([1.0] * 8)
    h.guard = GuardReading(metric="accuracy", reference=0.9, value=0.5, without={"0:0": 0.85})
    signal = h.end_epoch(0.5)  # at EVALUATING, ready, better on the task but the guard lost
    assert commands(signal) == [(KasminaCommandType.CULL, "0:0", None)]
    assert "guarded task's accuracy is 0.5" in h.decisions[-1].explanation
    assert h.reports[0].outcome is S.CULLED


def test_a_seed_stuck_in_training_is_culled():
    h = Harness(config(gates={"max_training_epochs": 3}))
    h.run([1.0] * 4)             # germinate at 3, advance to LOADING at 4
    h.hold = {"0:0"}             # isolated training never passes its test
    h.run([1.0] * 4)             # LOADING at 5, TRAINING at 6, 7, 8
    cull = next(d for d in h.decisions if d.action == "cull")
    assert cull.epoch == 8 and "no readiness after 3 epoch(s) in TRAINING" in cull.explanation
    (report,) = h.reports
    assert report.outcome is S.CULLED and report.epoch == 8
    assert "max_training_epochs=3" in report.reason


def test_a_kernel_that_never_loads_is_cancelled():
    h = Harness(config(gates={"max_loading_epochs": 2}))
    h.hold = {"0:0"}  # GERMINATED, never ready
    h.run([1.0] * 5)
    cancel = next(d for d in h.decisions if d.action == "cancel")
    assert cancel.epoch == 5 and "not ready after 2 epoch(s)" in cancel.explanation
    assert h.reports[0].outcome is S.CANCELLED and h.stage("0:0") is S.CANCELLED


def test_a_kernel_kasmina_cannot_load_is_reported_with_kasminas_reason():
    h = Harness(chooser=FixedKernelChooser([KernelCandidate(
        "0123456789ab-cpu-fast-abcdef", "0123456789ab" + "0" * 52,
        KernelInterface.parse("linear:8:4"))]))
    # Germinate at 3, to LOADING at 4 (the readiness here is the test's); at the boundary of 5
    # Kasmina finds the load failed and culls the seed by itself.
    h.run([1.0] * 5)
    (report,) = h.reports
    assert report.outcome is S.CULLED and report.epoch == 5
    assert report.reason.startswith("kernel load failed") and "0123456789ab" in report.reason
    assert h.stage("0:0") is S.CULLED


# Measured figures as Urabrask reports them: the biggest graft is the slowest.
SIZES = {"mlp_relu_w4": (72, 0.01), "mlp_silu_w64": (1096, 0.05), "mlp_gelu_w32": (552, 0.02)}


def sized(tamiyo_config: TamiyoConfig, *, seeds: int = 1, **harness) -> tuple[Harness, dict]:
    """A one-layer model (8 outputs, `seeds` seeds) whose chooser offers the three kernels of
    SIZES with their parameter counts, and the blueprint name of each kernel id."""
    h = Harness(tamiyo_config, kernels=tuple(SIZES), model=nn.Sequential(nn.Linear(8, 8)),
                kasmina_config={"seeds_per_layer": seeds}, **harness)
    by_id = {kid: ir.name for kid, (ir, _) in h.source.entries.items()}
    h.tamiyo.chooser = FixedKernelChooser([
        KernelCandidate(kid, "0" * 64, interface, parameters=SIZES[ir.name][0],
                        latency_ms=SIZES[ir.name][1])
        for kid, (ir, interface) in h.source.entries.items()])
    return h, by_id


def germinated(h: Harness, by_id: dict) -> list[tuple[str, str]]:
    return [(d.seed_id, by_id[d.kernel_artifact_id]) for d in h.decisions
            if d.action == "germinate"]


def test_kernel_rank_capacity_takes_the_largest_graft_within_max_parameters():
    def chosen(**kernel) -> tuple[str, str]:
        h, by_id = sized(config(kernel=kernel))
        h.run([1.0] * 3)
        decision = h.decisions[0]
        return by_id.get(decision.kernel_artifact_id, ""), decision.explanation

    name, why = chosen()  # the default: capacity
    assert name == "mlp_silu_w64"
    assert "1096 parameters): the best ranked (preferred tags 0, most parameters, then latency)" in why
    assert chosen(rank="latency")[0] == "mlp_relu_w4"
    assert chosen(max_parameters=600)[0] == "mlp_gelu_w32"
    name, why = chosen(max_parameters=10)
    assert name == "" and "none with a measured parameter count at most max_parameters=10" in why


def test_max_added_parameters_gives_each_graft_the_largest_kernel_that_fits_what_is_left():
    # Fossilized grafts keep their parameters: 1096 of 1700, then 552 of the 604 left.
    h, by_id = sized(config(max_added_parameters=1700), seeds=4)
    h.run([1.0] * 3 + [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5])
    assert [r.outcome for r in h.reports] == [S.FOSSILIZED]
    h.run([0.5] * 3 + [0.4, 0.3, 0.2, 0.1, 0.05, 0.05, 0.05])
    assert [r.outcome for r in h.reports] == [S.FOSSILIZED, S.FOSSILIZED]
    assert germinated(h, by_id) == [("0:0", "mlp_silu_w64"), ("0:1", "mlp_gelu_w32")]
    second = [d for d in h.decisions if d.action == "germinate"][1]
    assert "552 of the 604 parameter(s) left of max_added_parameters=1700, 52 left after it" in second.explanation
    h.run([0.05] * 6)  # 52 left: the smallest kernel (72) does not fit, said once
    assert len(germinated(h, by_id)) == 2
    (wait,) = [d for d in h.decisions if d.action == "wait"]
    assert "No VALIDATED kernel fits any free seed" in wait.explanation
    assert ("3 VALIDATED kernel(s) within max_risk, none with a measured parameter "
            "count within the 52 parameter(s) left of max_added_parameters=1700") in wait.explanation

    # Grafts under way count as well.
    under_way, by_id = sized(config(max_added_parameters=1700, max_concurrent=2,
                                    gates={"max_loading_epochs": 50}), seeds=4)
    under_way.hold = {"0:0", "0:1", "0:2", "0:3"}
    under_way.run([1.0] * 8)
    assert germinated(under_way, by_id) == [("0:0", "mlp_silu_w64"), ("0:1", "mlp_gelu_w32")]


def test_a_budget_that_fits_no_kernel_is_said_once_and_nothing_germinates():
    h, _ = sized(config(max_added_parameters=50), seeds=2)
    signals = h.run([1.0] * 8)
    assert all(not s.commands for s in signals)
    (wait,) = h.decisions
    assert wait.action == "wait" and wait.epoch == 3
    assert "within the 50 parameter(s) left of max_added_parameters=50" in wait.explanation
    # A kernel whose parameter count was not measured cannot be counted: it never fits.
    unknown = Harness(config(max_added_parameters=10**9))
    unknown.run([1.0] * 8)
    (wait,) = unknown.decisions
    assert "none with a measured parameter count within the 1000000000 parameter(s) left" in \
        wait.explanation


def test_a_graft_that_ends_without_being_kept_gives_its_parameters_back():
    # Culled: 1096 of 1200 come back, and the other seed gets the largest kernel again.
    h, by_id = sized(config(max_added_parameters=1200, gates={"max_training_epochs": 1}), seeds=2)
    h.run([1.0] * 4)          # 0:0 germinated at 3 with the largest kernel, LOADING at 4
    h.hold = {"0:0"}
    h.run([1.0] * 2)          # TRAINING at 6 without readiness: culled at once (limit 1)
    assert [r.outcome for r in h.reports] == [S.CULLED]
    h.hold = set()
    h.run([1.0] * 3)
    assert germinated(h, by_id) == [("0:0", "mlp_silu_w64"), ("0:1", "mlp_silu_w64")]

    # A germination Kasmina never applied: given back too.
    refused, by_id = sized(config(max_added_parameters=1096), seeds=2, observe=False)
    refused.dispatch = False
    refused.run([1.0] * 4)
    assert "did not happen" in refused.decisions[-1].explanation
    refused.dispatch = True
    refused.run([1.0] * 2)
    assert germinated(refused, by_id) == [("0:0", "mlp_silu_w64"), ("0:1", "mlp_silu_w64")]


def test_max_added_parameters_must_be_positive():
    assert TamiyoConfig.from_mapping({}).max_added_parameters is None
    for bad in (0, -5):
        with pytest.raises(BadInputError, match="field 'max_added_parameters'"):
            TamiyoConfig.from_mapping({"max_added_parameters": bad}, source="run.yaml")


# Embargo ------------------------------------------------------------------------------------

def test_a_culled_seed_is_not_proposed_until_kasminas_embargo_ends():
    single = nn.Sequential(nn.Linear(8, 8))
    h = Harness(config(gates={"max_training_epochs": 1}), model=single,
                kernels=("mlp_gelu_w32", "mlp_relu_w16"), kasmina_config={"seeds_per_layer": 1})
    h.run([1.0] * 4)          # germinate at 3, LOADING at 4
    h.hold = {"0:0"}
    h.run([1.0] * 2)          # LOADING at 5, TRAINING at 6: culled at once (limit 1)
    assert h.stage("0:0") is S.CULLED and h.reports[0].outcome is S.CULLED
    culled_at = h.reports[0].epoch
    h.hold = set()
    h.run([1.0] * 5)
    germinations = [(d.epoch, d.kernel_artifact_id) for d in h.decisions
                    if d.action == "germinate"]
    # embargo_epochs=3 from the boundary of the cull: Kasmina accepts at that + 3.
    assert germinations[1][0] == culled_at + 3
    # The kernel that failed here is not tried again at this seed.
    assert [k for _, k in germinations] == sorted(h.kernels["linear:8:8"])
    assert h.rejected == []
    waits = [d for d in h.decisions if d.action == "wait"]
    assert len(waits) == 1 and "(1 under embargo, 0 quarantined)" in waits[0].explanation


def test_embargo_is_tracked_from_health_alone():
    single = nn.Sequential(nn.Linear(8, 8))
    h = Harness(config(gates={"max_training_epochs": 1}), model=single, observe=False,
                kernels=("mlp_gelu_w32", "mlp_relu_w16"), kasmina_config={"seeds_per_layer": 1})
    h.run([1.0] * 4)
    h.hold = {"0:0"}
    h.run([1.0] * 2)
    h.hold = set()
    h.run([1.0] * 5)
    assert h.rejected == []
    (report,) = h.reports  # seen at the next epoch end, with the metrics before the cull
    assert report.outcome is S.CULLED and report.epoch == 6
    assert [e for e, a, _ in h.actions() if a == "germinate"] == [3, 9]


# Divergence and rollback --------------------------------------------------------------------

def test_divergence_asks_for_a_rollback_and_blames_the_latest_graft():
    h = Harness()
    h.run([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # 0:0 germinated at 3, GRAFTING from 6
    assert h.stage("0:0") is S.GRAFTING
    signal = h.end_epoch(3.5)  # > 3 x best 1.0
    assert signal.emergency_rollback_required and signal.commands == []
    assert "validation_loss 3.5 at epoch 7 is above 3 x the best 1" in signal.rollback_reason
    assert h.tamiyo.rollback_suspect == "0:0"
    decision = h.decisions[-1]
    assert decision.action == "rollback" and decision.seed_id == "0:0"
    nan = Harness().end_epoch(1.0, train_loss=float("nan"))
    assert nan.emergency_rollback_required and "non-finite train_loss" in nan.rollback_reason
    accuracy = Harness(config(plateau={"metric": "validation_accuracy"}))
    assert accuracy.end_epoch(1.0, validation_accuracy=float("nan")).emergency_rollback_required
    isolated = Harness()
    isolated.run([1.0] * 5)  # 0:0 in TRAINING: it does not touch the forward pass
    assert isolated.end_epoch(float("inf")).emergency_rollback_required
    assert isolated.tamiyo.rollback_suspect is None


def test_a_validation_loss_that_triples_while_the_training_loss_holds_is_not_divergence():
    # Over-fitting near zero: the validation loss triples, the training loss keeps its level.
    h = Harness()
    for _ in range(4):
        assert not h.end_epoch(0.02, train_loss=0.01).emergency_rollback_required
    assert not h.end_epoch(0.085, train_loss=0.015).emergency_rollback_required
    assert h.tamiyo.state_dict()["best_train_loss"] == 0.01
    # Both worse by more than the ratio: divergence, and the reason names both.
    signal = h.end_epoch(0.09, train_loss=0.05)
    assert signal.emergency_rollback_required
    assert "and train_loss 0.05 above 3 x its best 0.01" in signal.rollback_reason
    # A state saved before the training loss's best was kept still loads (no train check).
    old = h.tamiyo.state_dict()
    del old["best_train_loss"]
    h.tamiyo.load_state_dict(old)
    assert h.end_epoch(0.09, train_loss=0.011).emergency_rollback_required


def rolled_back(order: str, checkpoint_epoch: int) -> Harness:
    """Diverge with 1:1 grafting, roll back to the checkpoint of `checkpoint_epoch`, blame 1:1;
    Tolaria may tell Tamiyo before or after restoring (`order`)."""
    h = Harness()
    h.stats = {"1:1": {"gradient_energy": 1.0}}
    h.run([1.0] * checkpoint_epoch)
    model_state = copy.deepcopy(h.model.state_dict())
    tamiyo_state = json.loads(json.dumps(h.tamiyo.state_dict()))
    h.run([1.0] * (6 - checkpoint_epoch))  # 1:1 germinated at 3, GRAFTING from 6
    assert h.stage("1:1") is S.GRAFTING
    signal = h.end_epoch(float("nan"))
    suspect = h.tamiyo.rollback_suspect
    assert signal.emergency_rollback_required and suspect == "1:1"
    if order == "restore_first":
        h.model.load_state_dict(model_state)
        h.tamiyo.load_state_dict(tamiyo_state)
        h.tamiyo.on_rollback(suspect, signal.rollback_reason)
    else:
        h.tamiyo.on_rollback(suspect, signal.rollback_reason)
        h.model.load_state_dict(model_state)
        h.tamiyo.load_state_dict(tamiyo_state)
    h.epoch = checkpoint_epoch
    h.reports += h.tamiyo.drain_field_reports()
    h.decisions += h.tamiyo.drain_decisions()
    return h


@pytest.mark.parametrize("checkpoint_epoch", [2, 4])
def test_rollback_quarantines_the_seed_and_reports_it_once(checkpoint_epoch):
    first, second = rolled_back("restore_first", checkpoint_epoch), \
        rolled_back("report_first", checkpoint_epoch)
    assert [r.model_dump() for r in first.reports] == [r.model_dump() for r in second.reports]
    for h in (first, second):
        (report,) = h.reports
        assert report.outcome is S.ROLLED_BACK and report.seed_id == "1:1"
        assert report.kernel_artifact_id == h.kernels["linear:8:2"][0]
        assert (report.pre_metric, report.epoch) == (1.0, 7)
        assert "non-finite validation_loss" in report.reason
        assert h.tamiyo.quarantined_seeds == ["1:1"] and h.tamiyo.active_seeds == []
        rollback = h.decisions[-1]
        assert rollback.action == "rollback" and "quarantined" in rollback.explanation
        # The replayed epochs grow elsewhere: not at the seed, and not with its kernel, which
        # leaves layer 1 without one. A checkpoint taken mid-lifecycle brings the seed back in
        # LOADING: Tamiyo has Kasmina mark it ROLLED_BACK.
        h.run([1.0] * 4)
        assert h.stage("1:1") is (S.ROLLED_BACK if checkpoint_epoch == 4 else S.DORMANT)
        assert [d.seed_id for d in h.decisions if d.action == "germinate"][-1] == "0:0"
        assert len(h.reports) == 1 and h.rejected == []
        ids = [d.decision_id for d in h.decisions]
        assert len(ids) == len(set(ids))


def test_a_rollback_after_the_adaptation_ended_still_reports_its_kernel():
    h = Harness()
    h.run([1.0, 1.0, 1.0])
    h.tamiyo.on_rollback("0:0", "operator asked")
    (report,) = h.tamiyo.drain_field_reports()
    assert report.outcome is S.ROLLED_BACK and report.reason == "operator asked"
    h.tamiyo.on_rollback(None, "host diverged")
    assert h.tamiyo.drain_decisions()[-1].explanation.endswith("No seed was blamed.")
    with pytest.raises(BadInputError, match="not a seed of this model"):
        h.tamiyo.on_rollback("5:0", "x")


# Pause and kernels --------------------------------------------------------------------------

def test_pause_stops_new_germinations_only():
    h = Harness()
    h.tamiyo.pause_germination("operator")
    h.run([1.0] * 6)
    assert [a for _, a, _ in h.actions()] == ["wait"]
    assert "Germination is paused (operator)" in h.decisions[0].explanation
    h.tamiyo.resume_germination()
    h.end_epoch(1.0)
    assert h.actions()[-1] == (7, "germinate", "0:0")
    h.tamiyo.pause_germination()
    h.run([1.0] * 3)  # the adaptation under way goes on
    assert [a for e, a, _ in h.actions() if e > 7] == ["advance", "wait", "advance"]
    assert h.stage("0:0") is S.GRAFTING


def test_no_fitting_kernel_is_said_once_and_training_goes_on():
    chooser = FixedKernelChooser([])
    h = Harness(chooser=chooser)
    signals = h.run([1.0] * 8)
    assert all(not s.commands for s in signals)
    (wait,) = h.decisions
    assert wait.action == "wait" and wait.epoch == 3
    assert "No VALIDATED kernel fits any free seed" in wait.explanation
    assert "linear:8:2: no VALIDATED kernel for cpu/float32" in wait.explanation
    chooser.kernels.append(KernelCandidate(h.kernels["linear:8:2"][0], "a" * 64,
                                           KernelInterface.parse("linear:8:2")))
    signal = h.end_epoch(1.0)
    assert commands(signal) == [(KasminaCommandType.REQUEST_GERMINATION, "1:0", None)]
    decision = h.decisions[-1]
    assert "passed over stronger seed(s) 0:0, 0:1, with no usable kernel" in decision.explanation


def test_kernels_above_max_risk_are_not_used(workspace):
    with Urza.open(workspace) as urza:
        risky = validated_kernel(urza, workspace, "risky", risk=0.9, latency=0.1)
        h = Harness(urza=urza)
        h.run([1.0] * 3)
        (wait,) = h.decisions
        assert "linear:8:2: 1 VALIDATED kernel(s), all above max_risk=0.7" in wait.explanation
        assert risky not in wait.explanation


# Urza ---------------------------------------------------------------------------------------

def validated_kernel(urza: Urza, workspace, name: str, interface: str = "linear:8:2", *,
                     risk: float, latency: float, tags: tuple[str, ...] = ()) -> str:
    """A VALIDATED kernel the way the forge and the bench make one: a forge-signed manifest
    blob, the row, and a bench-signed report (no artifact files: Tamiyo only queries)."""
    ir = json.dumps({"name": name, "kind": "linear"}, sort_keys=True).encode()
    bp, _ = urza.add_blueprint(ir, name=name, interface_kind=LayerKind.LINEAR, actor="test")
    config_hash = hashlib.sha256(interface.encode()).hexdigest()[:6]
    artifact = CompiledKernelArtifact(
        id=f"{bp.id[:12]}-cpu-fast-{config_hash}", blueprint_id=bp.id,
        compilation_pipeline=CompilationPipeline.FAST, interface=KernelInterface.parse(interface),
        target="cpu", dtype="float32", toolchain_hash="0badc0de",
        kernel_binary_ref=urza.store.put(sign(f"manifest of {name}".encode(),
                                              workspace.private_key("forge"), signer="forge")))
    urza.add_kernel(artifact, actor="forge")
    report = UrabraskValidationReport(
        kernel_artifact_id=artifact.id, blueprint_id=bp.id, passed_validation=True,
        benchmark_results={LATENCY_MS: latency, MEMORY_MB: 1.0}, generated_tags=list(tags),
        risk_score=risk, conf_level="High")
    urza.apply_validation_report(sign(report.to_json().encode(), workspace.private_key("bench"),
                                      signer="bench"), actor="bench")
    return artifact.id


@pytest.mark.parametrize("prefer", [[], ["low_memory"]])
def test_urza_query_picks_the_best_kernel_within_risk_and_counts_interest(workspace, prefer):
    with Urza.open(workspace) as urza:
        validated_kernel(urza, workspace, "risky", risk=0.9, latency=0.1)
        fast = validated_kernel(urza, workspace, "fast", risk=0.2, latency=0.5)
        lean = validated_kernel(urza, workspace, "lean", risk=0.1, latency=1.0,
                                tags=("low_memory",))
        h = Harness(config(kernel={"prefer_tags": prefer}), urza=urza)
        h.dispatch = False  # Urza's kernels have no artifact files to load here
        h.stats = {"1:1": {"gradient_energy": 1.0}}
        signal = h.run([1.0] * 3)[-1]
        (command,) = signal.commands
        chosen = lean if prefer else fast
        assert command.kernel_artifact_id == chosen
        assert command.selected_for_tags == prefer
        decision = h.decisions[-1]
        assert f"chose {chosen}" in decision.explanation
        assert "gave 2 candidate(s)" in decision.explanation  # the risky one is filtered out
        assert decision.scores["risk_score"] == (0.1 if prefer else 0.2)
        interest = {urza.get_kernel(k).id: urza.get_blueprint(urza.get_kernel(k).blueprint_id)
                    .tamiyo_interest for k in (fast, lean)}
        assert interest == {chosen: 1.0, ({fast, lean} - {chosen}).pop(): 0.0}
        # Tolaria keeps Tamiyo's records in Urza: they are what the catalog accepts.
        assert urza.record_decision(decision)


def test_a_germination_kasmina_did_not_apply_is_noted_and_given_back():
    h = Harness(config(max_germinations=1), observe=False)
    h.dispatch = False
    h.run([1.0] * 4)
    refused = h.decisions[-1]
    assert refused.action == "wait" and "did not happen" in refused.explanation
    assert h.tamiyo.active_seeds == []
    h.dispatch = True
    h.run([1.0] * 2)  # the budget of one germination was given back
    assert [a for _, a, _ in h.actions()].count("germinate") == 2

    seen = Harness()
    seen.stats = {"0:0": {"gradient_energy": 1.0}}
    seen.run([1.0] * 2)
    # Someone else's germination reaches the seed first: Kasmina refuses Tamiyo's.
    other = KasminaControlCommand(
        command_id="op-1", run_id="run", target_layer_id=0, target_seed_id=0,
        kernel_artifact_id=seen.kernels["linear:8:4"][0],
        command=KasminaCommandType.REQUEST_GERMINATION)
    kasmina.dispatch(seen.model, [other])
    seen.end_epoch(1.0)
    assert len(seen.rejected) == 1
    assert "Kasmina refused it" in seen.decisions[-1].explanation


# Checkpoints and determinism ----------------------------------------------------------------

SCRIPT = [1.0, 1.0, 1.0, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.92, 0.92, 0.92, 0.92]


def scripted(harness: Harness, losses=SCRIPT):
    harness.stats = {"1:0": {"gradient_energy": 2.0, "activation_variance": 0.5},
                     "0:1": {"gradient_energy": 2.0, "activation_variance": 0.5}}
    harness.run(losses)
    return harness


def test_same_inputs_same_decisions():
    a = scripted(Harness(config(max_concurrent=2)))
    b = scripted(Harness(config(max_concurrent=2)))
    assert [d.model_dump() for d in a.decisions] == [d.model_dump() for d in b.decisions]
    assert [r.model_dump() for r in a.reports] == [r.model_dump() for r in b.reports]
    assert a.tamiyo.state_dict() == b.tamiyo.state_dict()
    # The tie between 0:1 and 1:0 is broken by seed id.
    assert [d.seed_id for d in a.decisions if d.action == "germinate"][:2] == ["0:1", "1:0"]


def test_state_dict_round_trips_through_json_and_decides_the_same():
    h = scripted(Harness(config(max_concurrent=2)), SCRIPT[:6])
    state = h.tamiyo.state_dict()
    text = json.dumps(state)
    twin = TamiyoController(h.model, config(max_concurrent=2), run_id="run",
                            kernel_chooser=FixedKernelChooser.from_entries(h.source.entries))
    twin.load_state_dict(json.loads(text))
    assert twin.state_dict() == state and state["active"]
    for loss in SCRIPT[6:]:
        h.epoch += 1
        health = h.health()
        packet = build_state_packet("run", h.epoch, health, validation_loss=loss)
        mine, theirs = h.tamiyo.step(packet, health), twin.step(packet, health)
        assert mine == theirs
        assert h.tamiyo.drain_decisions() == twin.drain_decisions()
        kasmina.dispatch(h.model, mine.commands)
        boundary = kasmina.on_epoch_end(h.model, h.epoch, "run")
        for layer in h.layers:
            layer.wait_for_loads()
        h.tamiyo.observe_boundary(boundary)
        twin.observe_boundary(boundary)
        assert h.tamiyo.drain_field_reports() == twin.drain_field_reports()
    assert h.tamiyo.state_dict() == twin.state_dict()
    with pytest.raises(BadInputError, match="not a Tamiyo state"):
        twin.load_state_dict({"format": "other"})
    with pytest.raises(BadInputError, match="malformed Tamiyo state"):
        twin.load_state_dict({**state, "plateau": {}})


def test_the_parameters_grafts_hold_survive_a_checkpoint_and_old_states_load():
    h, by_id = sized(config(max_added_parameters=1700), seeds=4)
    # 0:0 fossilized with 1096 parameters, then 0:1 germinated with 552: 52 left.
    h.run([1.0] * 3 + [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert [r.outcome for r in h.reports] == [S.FOSSILIZED]
    assert germinated(h, by_id)[-1] == ("0:1", "mlp_gelu_w32")
    state = json.loads(json.dumps(h.tamiyo.state_dict()))
    assert state["fossilized_parameters"] == 1096 and state["active"][0]["parameters"] == 552

    def twin(saved) -> TamiyoController:
        other = TamiyoController(h.model, config(max_added_parameters=1700, max_concurrent=2),
                                 run_id="run", kernel_chooser=h.tamiyo.chooser)
        other.load_state_dict(saved)
        return other

    restored = twin(state)
    assert restored.state_dict() == state
    # A second graft at once (max_concurrent 2): with 52 left nothing fits, and the twin knows.
    h.epoch += 1
    assert not restored.step(h.packet(0.5)).commands
    (wait,) = restored.drain_decisions()
    assert "within the 52 parameter(s) left of max_added_parameters=1700" in wait.explanation
    # A state saved before grafts were counted loads; what it held is not known (none).
    old = copy.deepcopy(state)
    del old["fossilized_parameters"], old["active"][0]["parameters"]
    (command,) = twin(old).step(h.packet(0.5)).commands
    assert by_id[command.kernel_artifact_id] == "mlp_silu_w64"


def test_the_packet_alone_is_enough():
    h = Harness()
    h.stats = {"1:1": {"gradient_energy": 1.0}}
    for _ in range(3):
        h.epoch += 1
        signal = h.tamiyo.step(h.packet(1.0))
    assert commands(signal) == [(KasminaCommandType.REQUEST_GERMINATION, "1:1", None)]


# Bad input ----------------------------------------------------------------------------------

def test_bad_inputs_are_named():
    h = Harness()
    packet = h.packet(1.0)
    partial = packet.model_copy(update={"seed_states": {"0:0": S.DORMANT, "0:2": S.DORMANT}})
    with pytest.raises(BadInputError, match="skip seeds of layer 0"):
        h.tamiyo.step(partial)
    short = packet.model_copy(update={"seed_states": {"0:0": S.DORMANT}})
    with pytest.raises(BadInputError, match="layer 0 reports 1 seeds; the model's layer has 2"):
        h.tamiyo.step(short)
    with pytest.raises(BadInputError, match="got no seeds"):
        h.tamiyo.step(h.packet(1.0).model_copy(update={"seed_states": {}}))
    with pytest.raises(BadInputError, match="'gnn' is not available"):
        TamiyoController(h.model, {"policy": "gnn"})
    with pytest.raises(BadInputError, match="not both"):
        TamiyoController(h.model, urza=object(), kernel_chooser=FixedKernelChooser())
    with pytest.raises(BadInputError, match="field 'plateau.patience'"):
        TamiyoController(h.model, {"plateau": {"patience": 0}})
    stranger = h.health()[0].model_copy(update={"layer_id": 7})
    with pytest.raises(BadInputError, match="seed 7:0 is not a seed of this model"):
        h.tamiyo.step(build_state_packet("run", 1, [stranger], validation_loss=1.0), [stranger])
    with pytest.raises(BadInputError, match="field 'target'"):
        TamiyoController(h.model, device_target="cuda:0")
    with pytest.raises(BadInputError, match="field 'preferred_tags.0'"):
        TamiyoController(h.model, {"kernel": {"prefer_tags": ["Low Memory"]}})
    with pytest.raises(BadInputError, match="KasminaLayers"):
        TamiyoController([nn.Linear(2, 2)])
