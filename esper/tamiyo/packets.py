"""What Tamiyo sees at an epoch end: the SystemStatePacket Tolaria builds, and every seed's
stage, readiness and chunk health as one table of columns (read from the layers'
HealthSignals, or from the packet's `seed_states` and `health_map`).

Columns, not one object per seed: at 10,000 seeds a decision has a few milliseconds, and only
the seeds Tamiyo acts on become `SeedObservation`s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from esper.contracts import (
    GuardReading,
    HardwareContext,
    HealthSignal,
    SeedLifecycle,
    SystemStatePacket,
    seed_id,
)
from esper.errors import BadInputError

# Per-seed statistics carried in SystemStatePacket.health_map (readiness as 1.0 / 0.0).
HEALTH_KEYS = ("activation_mean", "activation_variance", "dead_ratio", "gradient_energy", "ready")
_STAGES = list(SeedLifecycle)
_CODE = {stage: code for code, stage in enumerate(_STAGES)}
TERMINAL_CODES = np.array([stage.is_terminal for stage in _STAGES])


def seed_key(sid: str) -> tuple[int, int]:
    """Seed ids in numeric order ("2:0" before "10:0"): every tie is broken by this."""
    layer, _, index = sid.partition(":")
    return int(layer), int(index)


@dataclass(frozen=True)
class SeedObservation:
    """One seed at an epoch end: its stage, readiness and the health statistics of its chunk."""

    seed_id: str
    stage: SeedLifecycle
    ready: bool
    gradient_energy: float = 0.0
    activation_variance: float = 0.0
    dead_ratio: float = 0.0


@dataclass(frozen=True)
class SeedTable:
    """Every seed at an epoch end, one row per seed, rows in seed order (layer, then index).

    `starts[layer_id]` is the layer's first row; its seeds 0..n-1 are the rows that follow.
    Statistics that are missing or not finite read 0.
    """

    layer: np.ndarray                # (N,) int64
    index: np.ndarray                # (N,) int64
    stage: np.ndarray                # (N,) int64 SeedLifecycle codes
    ready: np.ndarray                # (N,) bool
    gradient_energy: np.ndarray      # (N,) float64
    activation_variance: np.ndarray  # (N,) float64
    dead_ratio: np.ndarray           # (N,) float64
    starts: dict[int, int]
    counts: dict[int, int]

    def __len__(self) -> int:
        return len(self.layer)

    def row(self, sid: str) -> int | None:
        layer, index = seed_key(sid)
        if layer not in self.starts or not 0 <= index < self.counts[layer]:
            return None
        return self.starts[layer] + index

    def seed_id(self, row: int) -> str:
        return seed_id(int(self.layer[row]), int(self.index[row]))

    def stage_of(self, row: int) -> SeedLifecycle:
        return _STAGES[int(self.stage[row])]

    def observation(self, row: int) -> SeedObservation:
        return SeedObservation(
            seed_id=self.seed_id(row), stage=self.stage_of(row), ready=bool(self.ready[row]),
            gradient_energy=float(self.gradient_energy[row]),
            activation_variance=float(self.activation_variance[row]),
            dead_ratio=float(self.dead_ratio[row]))

    def rows_in(self, *stages: SeedLifecycle) -> np.ndarray:
        return np.flatnonzero(np.isin(self.stage, [_CODE[s] for s in stages]))

    @classmethod
    def from_health(cls, health: Iterable[HealthSignal]) -> SeedTable:
        signals = sorted(health, key=lambda s: s.layer_id)
        if len({s.layer_id for s in signals}) != len(signals):
            raise BadInputError("two health signals for one layer")
        counts = {s.layer_id: len(s.lifecycle) for s in signals}
        return cls._build(
            counts,
            stage=[_CODE[stage] for s in signals for stage in s.lifecycle],
            ready=[r for s in signals for r in s.is_ready_for_transition],
            gradient_energy=[v for s in signals for v in s.gradient_energy],
            activation_variance=[v for s in signals for v in s.activation_variance],
            dead_ratio=[v for s in signals for v in s.dead_ratio])

    @classmethod
    def from_maps(cls, seed_states: Mapping[str, SeedLifecycle],
                  health_map: Mapping[str, Mapping[str, float]]) -> SeedTable:
        """From a packet's `seed_states` and `health_map`; every layer must list all its seeds."""
        ids = sorted(seed_states, key=seed_key)
        counts: dict[int, int] = {}
        for sid in ids:
            layer, index = seed_key(sid)
            if index != counts.get(layer, 0):
                raise BadInputError(f"the packet's seed_states skip seeds of layer {layer} "
                                    f"(found {sid}); list every seed of a layer")
            counts[layer] = index + 1
        stats = [health_map.get(sid, {}) for sid in ids]
        return cls._build(
            counts, stage=[_CODE[seed_states[sid]] for sid in ids],
            ready=[s.get("ready", 0.0) >= 0.5 for s in stats],
            gradient_energy=[s.get("gradient_energy", 0.0) for s in stats],
            activation_variance=[s.get("activation_variance", 0.0) for s in stats],
            dead_ratio=[s.get("dead_ratio", 0.0) for s in stats])

    @classmethod
    def _build(cls, counts: dict[int, int], *, stage: Sequence[int], ready: Sequence[bool],
               **stats: Sequence[float]) -> SeedTable:
        starts, layer, index, row = {}, [], [], 0
        for layer_id, n in counts.items():
            starts[layer_id] = row
            layer.append(np.full(n, layer_id, dtype=np.int64))
            index.append(np.arange(n, dtype=np.int64))
            row += n
        empty = np.zeros(0, dtype=np.int64)
        columns = {name: np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0,
                                       posinf=0.0, neginf=0.0)
                   for name, values in stats.items()}
        return cls(layer=np.concatenate(layer) if layer else empty,
                   index=np.concatenate(index) if index else empty,
                   stage=np.asarray(stage, dtype=np.int64), ready=np.asarray(ready, dtype=bool),
                   starts=starts, counts=dict(counts), **columns)


def seed_maps(health: Iterable[HealthSignal]) -> tuple[dict[str, SeedLifecycle],
                                                        dict[str, dict[str, float]]]:
    """(seed_states, health_map) of a SystemStatePacket, from the layers' HealthSignals."""
    states: dict[str, SeedLifecycle] = {}
    stats: dict[str, dict[str, float]] = {}
    for signal in health:
        for i, stage in enumerate(signal.lifecycle):
            sid = seed_id(signal.layer_id, i)
            if sid in states:
                raise BadInputError("two health signals for one layer")
            states[sid] = stage
            stats[sid] = {"activation_mean": signal.activation_mean[i],
                          "activation_variance": signal.activation_variance[i],
                          "dead_ratio": signal.dead_ratio[i],
                          "gradient_energy": signal.gradient_energy[i],
                          "ready": 1.0 if signal.is_ready_for_transition[i] else 0.0}
    return states, stats


def build_state_packet(run_id: str, epoch: int, health: Iterable[HealthSignal], *,
                       validation_loss: float, validation_accuracy: float | None = None,
                       train_loss: float | None = None, global_step: int = 0,
                       hardware: HardwareContext | None = None,
                       include_seeds: bool = True,
                       guard: GuardReading | None = None) -> SystemStatePacket:
    """Tolaria's end-of-epoch packet: the run's metrics and, with `include_seeds`, every seed's
    stage and health (`seed_states`, `health_map` keyed `layer:index`) from the layers'
    HealthSignals. At thousands of seeds leave them out and pass the HealthSignals to
    `TamiyoController.step` directly: the maps cost more to build than the decision."""
    states, stats = seed_maps(health) if include_seeds else ({}, {})
    return SystemStatePacket(
        run_id=run_id, current_epoch=epoch, global_step=global_step,
        train_loss=None if train_loss is None else float(train_loss),
        validation_accuracy=None if validation_accuracy is None else float(validation_accuracy),
        validation_loss=float(validation_loss),
        hardware_context=hardware or HardwareContext(device_type="cpu", memory_available_gb=0.0),
        health_map=stats, seed_states=states, guard=guard)
