"""The seed lifecycle (HLD Appendix B): the enforced transition table and what each stage does
in the forward pass and to the optimizer (DESIGN.md section 10)."""

from __future__ import annotations

from esper.contracts import LIFECYCLE_TRANSITIONS, SeedLifecycle
from esper.errors import IllegalTransitionError

S = SeedLifecycle

# How a cull for an exception raised by a seed's blueprint in a forward pass begins its reason.
RUNTIME_ERROR = "runtime error"
# How a cull for a kernel that failed to load (refused by the verifying loader, say) begins it.
LOAD_FAILED = "kernel load failed"
# Stages whose blueprint output is blended into the host chunk.
BLENDING = frozenset({S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED})
# Stages whose blueprint runs on detached inputs for its own objective, off the host's graph.
ISOLATED = frozenset({S.TRAINING})
# Stages that hold a seed module (parameters) in the layer.
HOLDS_MODULE = BLENDING | ISOLATED
# Stages whose seed parameters an optimizer should update now.
TRAINABLE = frozenset({S.TRAINING, S.GRAFTING, S.FINE_TUNING})
# Stages that return to DORMANT by themselves at the boundary after they were entered.
RETURNS_TO_DORMANT = frozenset({S.CULLED, S.CANCELLED})
# Stages in which a kernel is assigned (fetched, loading, or running).
HAS_KERNEL = HOLDS_MODULE | {S.GERMINATED, S.LOADING}


def check_transition(seed: str, current: SeedLifecycle, target: SeedLifecycle) -> None:
    """Raise IllegalTransitionError unless the table allows `current -> target`."""
    if target not in LIFECYCLE_TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in LIFECYCLE_TRANSITIONS[current])) or "none"
        raise IllegalTransitionError(
            f"seed {seed}: illegal transition {current.value} -> {target.value} (allowed: {allowed})")
