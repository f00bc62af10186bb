"""Status and lifecycle enumerations shared by every subsystem (HLD 8.1.1, Appendix B)."""

from __future__ import annotations

from enum import Enum


class BlueprintStatus(str, Enum):
    """A blueprint design: UNVALIDATED -> COMPILING -> COMPILED | INVALID, and ARCHIVED."""

    UNVALIDATED = "UNVALIDATED"
    COMPILING = "COMPILING"
    COMPILED = "COMPILED"
    INVALID = "INVALID"
    ARCHIVED = "ARCHIVED"


class KernelStatus(str, Enum):
    """A compiled kernel artifact: PENDING_BENCHMARKING -> VALIDATED | REJECTED, and ARCHIVED."""

    PENDING_BENCHMARKING = "PENDING_BENCHMARKING"
    VALIDATED = "VALIDATED"
    REJECTED = "REJECTED"
    ARCHIVED = "ARCHIVED"


# Legal status changes. Anything else is an IllegalTransitionError, never an overwrite.
# COMPILING -> UNVALIDATED is a released or expired claim; COMPILED -> COMPILING a recompile.
BLUEPRINT_TRANSITIONS: dict[BlueprintStatus, frozenset[BlueprintStatus]] = {
    BlueprintStatus.UNVALIDATED: frozenset(
        {BlueprintStatus.COMPILING, BlueprintStatus.INVALID, BlueprintStatus.ARCHIVED}
    ),
    BlueprintStatus.COMPILING: frozenset(
        {BlueprintStatus.COMPILED, BlueprintStatus.INVALID, BlueprintStatus.UNVALIDATED}
    ),
    BlueprintStatus.COMPILED: frozenset({BlueprintStatus.COMPILING, BlueprintStatus.ARCHIVED}),
    BlueprintStatus.INVALID: frozenset({BlueprintStatus.ARCHIVED}),
    BlueprintStatus.ARCHIVED: frozenset(),
}

KERNEL_TRANSITIONS: dict[KernelStatus, frozenset[KernelStatus]] = {
    KernelStatus.PENDING_BENCHMARKING: frozenset(
        {KernelStatus.VALIDATED, KernelStatus.REJECTED, KernelStatus.ARCHIVED}
    ),
    KernelStatus.VALIDATED: frozenset({KernelStatus.ARCHIVED}),
    KernelStatus.REJECTED: frozenset({KernelStatus.ARCHIVED}),
    KernelStatus.ARCHIVED: frozenset(),
}


class SeedLifecycle(str, Enum):
    """The 11 stages of a seed (HLD Appendix B) plus LOADING. `code` is the state-tensor value."""

    DORMANT = "DORMANT"
    GERMINATED = "GERMINATED"
    LOADING = "LOADING"
    TRAINING = "TRAINING"
    GRAFTING = "GRAFTING"
    STABILIZATION = "STABILIZATION"
    EVALUATING = "EVALUATING"
    FINE_TUNING = "FINE_TUNING"
    FOSSILIZED = "FOSSILIZED"
    CULLED = "CULLED"
    CANCELLED = "CANCELLED"
    ROLLED_BACK = "ROLLED_BACK"

    @property
    def code(self) -> int:
        return _LIFECYCLE_ORDER.index(self)

    @classmethod
    def from_code(cls, code: int) -> SeedLifecycle:
        return _LIFECYCLE_ORDER[code]

    @property
    def is_terminal(self) -> bool:
        """Ends an adaptation: a FieldReport is emitted on entering one of these."""
        return self in TERMINAL_STAGES

    def can_transition_to(self, other: SeedLifecycle) -> bool:
        return other in LIFECYCLE_TRANSITIONS[self]


_LIFECYCLE_ORDER = list(SeedLifecycle)

TERMINAL_STAGES = frozenset(
    {SeedLifecycle.FOSSILIZED, SeedLifecycle.CULLED, SeedLifecycle.CANCELLED, SeedLifecycle.ROLLED_BACK}
)

# HLD B.3. ROLLED_BACK is reachable from any active stage (Tolaria's emergency rollback) and
# locks the seed; CULLED and CANCELLED return the slot to DORMANT (under embargo after a cull).
_ACTIVE = (
    SeedLifecycle.GERMINATED,
    SeedLifecycle.LOADING,
    SeedLifecycle.TRAINING,
    SeedLifecycle.GRAFTING,
    SeedLifecycle.STABILIZATION,
    SeedLifecycle.EVALUATING,
    SeedLifecycle.FINE_TUNING,
)
LIFECYCLE_TRANSITIONS: dict[SeedLifecycle, frozenset[SeedLifecycle]] = {
    SeedLifecycle.DORMANT: frozenset({SeedLifecycle.GERMINATED}),
    SeedLifecycle.GERMINATED: frozenset({SeedLifecycle.LOADING, SeedLifecycle.CANCELLED}),
    SeedLifecycle.LOADING: frozenset(
        {SeedLifecycle.TRAINING, SeedLifecycle.GRAFTING, SeedLifecycle.CULLED, SeedLifecycle.CANCELLED}
    ),
    SeedLifecycle.TRAINING: frozenset(
        {SeedLifecycle.GRAFTING, SeedLifecycle.CULLED, SeedLifecycle.CANCELLED}
    ),
    SeedLifecycle.GRAFTING: frozenset({SeedLifecycle.STABILIZATION, SeedLifecycle.CULLED}),
    SeedLifecycle.STABILIZATION: frozenset({SeedLifecycle.EVALUATING, SeedLifecycle.CULLED}),
    SeedLifecycle.EVALUATING: frozenset(
        {SeedLifecycle.FINE_TUNING, SeedLifecycle.FOSSILIZED, SeedLifecycle.CULLED}
    ),
    SeedLifecycle.FINE_TUNING: frozenset({SeedLifecycle.FOSSILIZED, SeedLifecycle.CULLED}),
    SeedLifecycle.FOSSILIZED: frozenset(),
    SeedLifecycle.CULLED: frozenset({SeedLifecycle.DORMANT}),
    SeedLifecycle.CANCELLED: frozenset({SeedLifecycle.DORMANT}),
    SeedLifecycle.ROLLED_BACK: frozenset(),
}
for _stage in _ACTIVE:
    LIFECYCLE_TRANSITIONS[_stage] = LIFECYCLE_TRANSITIONS[_stage] | {SeedLifecycle.ROLLED_BACK}


class LayerKind(str, Enum):
    """The host module kinds a blueprint can attach to."""

    LINEAR = "linear"
    CONV2D = "conv2d"


class GraftingStrategy(str, Enum):
    """How alpha ramps during GRAFTING (kasmina-migration-plan)."""

    FIXED_RAMP = "fixed_ramp"
    PERFORMANCE_LINKED = "performance_linked"
    DRIFT_CONTROLLED = "drift_controlled"
    GRAD_NORM_GATED = "grad_norm_gated"


class KasminaCommandType(str, Enum):
    REQUEST_GERMINATION = "request_germination"
    CANCEL_GERMINATION = "cancel_germination"
    ADVANCE = "advance"
    CULL = "cull"


class RunControlAction(str, Enum):
    PAUSE = "pause"
    RESUME = "resume"
    FORCE_ROLLBACK = "force_rollback"
    STOP = "stop"
