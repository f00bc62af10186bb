"""The heuristic policy's pieces, as pure functions of what Tamiyo observed (DESIGN.md 11):
plateau detection, bottleneck ranking of locations, and the lifecycle gates. No torch, no IO:
the controller wires these together and keeps the state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from esper.contracts import GuardReading, SeedLifecycle
from esper.tamiyo.config import GateConfig, LocationConfig
from esper.tamiyo.packets import SeedObservation, seed_key
from kasmina.lifecycle import BLENDING

S = SeedLifecycle

# The metrics a plateau can be watched on, and whether lower is better.
LOWER_IS_BETTER: dict[str, bool] = {"validation_loss": True, "train_loss": True,
                                    "validation_accuracy": False}


# --- plateau -------------------------------------------------------------------------------

@dataclass
class Plateau:
    """Epochs since the watched metric last improved on its best by more than `min_delta` (plus
    `min_delta_relative` times the best's magnitude). With `slowdown`, an epoch whose gain is
    under `slowdown` times the largest gain of the run so far counts as stale too, even when it
    is a new best: learning has slowed to a fraction of its pace, the sign of a capacity limit
    that a fixed threshold sees only near convergence."""

    best: float | None = None
    stale: int = 0
    largest_gain: float = 0.0

    def update(self, value: float, *, lower_is_better: bool, min_delta: float,
               min_delta_relative: float = 0.0, slowdown: float = 0.0) -> bool:
        """Fold in one epoch's value; True when it improved."""
        if self.best is None:
            self.best, self.stale = value, 0
            return True
        gain = self.best - value if lower_is_better else value - self.best
        slowed = slowdown > 0 and gain < slowdown * self.largest_gain
        self.largest_gain = max(self.largest_gain, gain)
        if gain > min_delta + min_delta_relative * abs(self.best) and not slowed:
            self.best, self.stale = value, 0
            return True
        if gain > 0 and slowed:
            self.best = value  # a new best, but a slow one
        self.stale += 1
        return False

    def to_json(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale, "largest_gain": self.largest_gain}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plateau:
        return cls(best=data["best"], stale=int(data["stale"]),
                   largest_gain=float(data.get("largest_gain", 0.0)))  # absent before slowdown


def improvement(metric: str, before: float, after: float) -> float:
    """How much better `after` is than `before` on `metric` (positive: better)."""
    return before - after if LOWER_IS_BETTER[metric] else after - before


# --- where to grow -------------------------------------------------------------------------

@dataclass(frozen=True)
class Ranking:
    """Candidate seeds by bottleneck score. Arrays are per candidate, in the order given;
    `order` lists the candidates strongest first (equal scores in seed-id order)."""

    order: np.ndarray
    score: np.ndarray
    gradient_energy_rank: np.ndarray
    low_variance_rank: np.ndarray
    dead_ratio_rank: np.ndarray


def rank_bottlenecks(gradient_energy: np.ndarray, activation_variance: np.ndarray,
                     dead_ratio: np.ndarray, layer: np.ndarray, index: np.ndarray,
                     weights: LocationConfig, held: np.ndarray | None = None) -> Ranking:
    """A chunk is a bottleneck when the loss pushes hard on it (high gradient energy), when it
    carries little signal (low activation variance), or when its units are dead (high dead
    ratio). Each statistic is ranked among the candidates and scaled to [0, 1] (1: the
    strongest sign); the score is the weighted sum. Ranks, not raw values: the statistics of
    different layers are on different scales.

    A chunk whose every output is zero (a span before its first graft: `mlp(spans=True)`) has
    no signal to read, only a gradient: its variance and dead ranks are its gradient energy's,
    and the others' are ranked among themselves. Otherwise it would read as the most dead and
    the least varied of all, and win before any layer whatever its gradient.

    With `weights.spread`, `held` (per candidate: the grafts its layer holds already) orders
    first, fewest first, and the score only within a layer count: grafts spread over layers."""
    energy = _ranks(gradient_energy)
    silent = (activation_variance == 0) & (dead_ratio >= 1)
    low_variance, dead = energy.copy(), energy.copy()
    low_variance[~silent] = _ranks(-activation_variance[~silent])
    dead[~silent] = _ranks(dead_ratio[~silent])
    score = (weights.gradient_energy_weight * energy + weights.variance_weight * low_variance
             + weights.dead_ratio_weight * dead)
    keys = (index, layer, -score)  # np.lexsort sorts by the last key first: score, then seed id
    if weights.spread and held is not None:
        keys = (*keys, held)
    return Ranking(np.lexsort(keys), score, energy, low_variance, dead)


@dataclass(frozen=True)
class LocationScore:
    """One candidate's bottleneck score and the ranks it is made of."""

    seed_id: str
    score: float
    gradient_energy_rank: float
    low_variance_rank: float
    dead_ratio_rank: float
    observation: SeedObservation

    @classmethod
    def of(cls, ranking: Ranking, i: int, observation: SeedObservation) -> LocationScore:
        return cls(observation.seed_id, float(ranking.score[i]),
                   float(ranking.gradient_energy_rank[i]), float(ranking.low_variance_rank[i]),
                   float(ranking.dead_ratio_rank[i]), observation)

    def scores(self) -> dict[str, float]:
        o = self.observation
        return {"bottleneck_score": self.score,
                "gradient_energy_rank": self.gradient_energy_rank,
                "low_variance_rank": self.low_variance_rank,
                "dead_ratio_rank": self.dead_ratio_rank, "gradient_energy": o.gradient_energy,
                "activation_variance": o.activation_variance, "dead_ratio": o.dead_ratio}


def rank_locations(candidates: Sequence[SeedObservation],
                   weights: LocationConfig) -> list[LocationScore]:
    """`rank_bottlenecks` over a list of observations, strongest first."""
    keys = [seed_key(c.seed_id) for c in candidates]
    ranking = rank_bottlenecks(
        np.array([c.gradient_energy for c in candidates], dtype=np.float64),
        np.array([c.activation_variance for c in candidates], dtype=np.float64),
        np.array([c.dead_ratio for c in candidates], dtype=np.float64),
        np.array([k[0] for k in keys], dtype=np.int64),
        np.array([k[1] for k in keys], dtype=np.int64), weights)
    return [LocationScore.of(ranking, int(i), candidates[i]) for i in ranking.order]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank among `values` scaled to [0, 1] (largest: 1); ties share their mean
    rank; a single value ranks 1."""
    n = len(values)
    if n <= 1:
        return np.ones(n)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]   # (n,) where each run of ties starts
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], n] - 1
    ranks = np.empty(n)
    ranks[order] = ((starts + ends) / 2 / (n - 1))[np.cumsum(first) - 1]
    return ranks


# --- the lifecycle gates -------------------------------------------------------------------

# Blending and not yet fossilized: the grafts the guarded task's loss can be blamed on.
GUARDED = BLENDING - {S.FOSSILIZED}

@dataclass(frozen=True)
class Verdict:
    """What the gate says for one adaptation this epoch. `action` None: nothing to say."""

    action: str | None                    # "advance", "cull", "cancel", "hold" or None
    target: SeedLifecycle | None = None   # the stage an "advance" moves to
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)


NOTHING = Verdict(None)


def gate(stage: SeedLifecycle, ready: bool, epochs_in_stage: int, *, trained: bool,
         gain: float | None, metric: str, gates: GateConfig,
         guard: tuple[GuardReading, float] | None = None) -> Verdict:
    """The lifecycle gate of an adaptation in `stage` after `epochs_in_stage` epoch ends there.

    `gain`: the watched metric's improvement since germination (positive: better). `guard`: the
    guarded task's reading and its value with this seed disabled, given for a graft the reading
    blames (`GuardReading.blamed`): one that blends and is not yet fossilized is culled at any
    epoch end the guarded task's loss can be blamed on it, ready or not.
    """
    n = epochs_in_stage
    if stage in GUARDED and guard is not None:
        verdict = _guard_gate(*guard, gates.guard_max_degradation)
        if verdict is not None:
            return verdict
    if stage is S.GERMINATED:
        if ready:
            return Verdict("advance", S.LOADING, "the kernel is fetched and verified")
        if n >= gates.max_loading_epochs:
            return Verdict("cancel", None, f"the kernel was not ready after {n} epoch(s) "
                           f"(limit max_loading_epochs={gates.max_loading_epochs})")
    elif stage is S.LOADING:
        if n >= gates.max_loading_epochs:
            return Verdict("cancel", None, f"still LOADING after {n} epoch(s) "
                           f"(limit max_loading_epochs={gates.max_loading_epochs})")
    elif stage is S.TRAINING:
        if ready:
            return Verdict("advance", S.GRAFTING, "isolated training passed its readiness test")
        if n >= gates.max_training_epochs:
            return Verdict("cull", None, f"no readiness after {n} epoch(s) in TRAINING "
                           f"(limit max_training_epochs={gates.max_training_epochs})")
    elif stage is S.GRAFTING:
        if ready:
            return Verdict("advance", S.STABILIZATION, "the alpha ramp is complete")
        if gates.max_grafting_epochs is not None and n >= gates.max_grafting_epochs:
            return Verdict("cull", None, f"the alpha ramp did not complete in {n} epoch(s) "
                           f"(limit max_grafting_epochs={gates.max_grafting_epochs})")
    elif stage is S.STABILIZATION:
        if ready:
            return Verdict("advance", S.EVALUATING, "stabilization steps are done")
    elif stage is S.EVALUATING and ready and gain is not None:
        scores = {"metric_gain": gain, "keep_min_improvement": gates.keep_min_improvement,
                  "cull_max_degradation": gates.cull_max_degradation}
        measured = f"{metric} changed by {_signed(gain)} since germination (positive: better)"
        if gain >= gates.keep_min_improvement:
            target = S.FINE_TUNING if trained else S.FOSSILIZED
            why = "" if trained else "; a fixed-function kernel skips FINE_TUNING"
            return Verdict("advance", target, f"keep: {measured}, at least keep_min_improvement="
                           f"{gates.keep_min_improvement:g}{why}", scores)
        if gain < -gates.cull_max_degradation:
            return Verdict("cull", None, f"{measured}: worse by more than cull_max_degradation="
                           f"{gates.cull_max_degradation:g}", scores)
        if n >= gates.max_evaluation_epochs:
            return Verdict("cull", None, f"inconclusive after {n} epoch(s) in EVALUATING: "
                           f"{measured}, below keep_min_improvement={gates.keep_min_improvement:g}"
                           f" (limit max_evaluation_epochs={gates.max_evaluation_epochs})", scores)
        return Verdict("hold", None, f"inconclusive: {measured}, below keep_min_improvement="
                       f"{gates.keep_min_improvement:g} but not worse than cull_max_degradation="
                       f"{gates.cull_max_degradation:g}; evaluating again", scores)
    elif stage is S.FINE_TUNING and ready and gain is not None:
        scores = {"metric_gain": gain, "cull_max_degradation": gates.cull_max_degradation}
        measured = f"{metric} changed by {_signed(gain)} since germination (positive: better)"
        if gain < -gates.cull_max_degradation:
            return Verdict("cull", None, f"{measured}: worse by more than cull_max_degradation="
                           f"{gates.cull_max_degradation:g} after fine-tuning", scores)
        return Verdict("advance", S.FOSSILIZED, f"fine-tuning done and {measured}", scores)
    return NOTHING


def _guard_gate(reading: GuardReading, without: float, limit: float) -> Verdict | None:
    """Cull a graft that the guarded task's degradation can be blamed on: the task reads worse
    than at the run's start by more than `limit`, and better with the graft disabled."""
    lost = reading.degradation()
    better_without = without > reading.value if reading.higher_is_better else without < reading.value
    if lost <= limit or not better_without:
        return None
    return Verdict("cull", None, f"the guarded task's {reading.metric} is {reading.value:.6g}, "
                   f"{lost:.2%} worse than {reading.reference:.6g} at the run's start (limit "
                   f"guard_max_degradation={limit:g}), and {without:.6g} without this graft",
                   {"guard_value": reading.value, "guard_reference": reading.reference,
                    "guard_without": without, "guard_max_degradation": limit})


def _signed(x: float) -> str:
    return f"{x:+.6g}"
