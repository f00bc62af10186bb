"""The alpha ramp of GRAFTING: four strategies (kasmina-migration-plan, phase 5), vectorized
over the seeds of a layer and computed on the device with no host sync.

Each returns the new alpha of the seeds given their current alpha and the strategy's signals;
see `GraftingConfig` for the gates. A missing signal (NaN: not measured yet) leaves the gate
open, so every strategy degrades to the fixed ramp rather than stalling.
"""

from __future__ import annotations

import torch

from esper.contracts import GraftingStrategy
from kasmina.config import GraftingConfig

STRATEGIES = list(GraftingStrategy)


def ramp(strategy: GraftingStrategy, alpha: torch.Tensor, config: GraftingConfig, *,
         loss: torch.Tensor | None = None, reference: torch.Tensor | None = None,
         signal: torch.Tensor | None = None) -> torch.Tensor:
    """alpha moved by one ramp unit, clamped to [0, 1].

    performance_linked: `loss` (scalar, the observed task loss EMA) vs `reference` (its value
    at graft start, per seed). drift_controlled: `signal` = alpha * rms(g) / rms(out) per seed.
    grad_norm_gated: `signal` = the chunk's output-gradient RMS, `reference` its value at graft
    start.
    """
    if strategy is GraftingStrategy.FIXED_RAMP:  # the step as a scalar: the same float32 add, one op fewer
        return (alpha + 1.0 / config.ramp_length).clamp(0.0, 1.0)
    step = torch.full_like(alpha, 1.0 / config.ramp_length)
    if strategy is GraftingStrategy.PERFORMANCE_LINKED:
        if loss is None:
            change = step
        else:  # no reference or no loss yet (NaN): the ramp goes on
            limit = reference * (1 + config.loss_tolerance)
            better = torch.isnan(reference) | torch.isnan(loss) | (loss <= limit)
            change = torch.where(better, step, -step)
    elif strategy is GraftingStrategy.DRIFT_CONTROLLED:
        open_ = torch.isnan(signal) | (signal < config.max_drift)
        change = torch.where(open_, step, torch.zeros_like(step))
    elif strategy is GraftingStrategy.GRAD_NORM_GATED:
        open_ = torch.isnan(signal) | torch.isnan(reference) | (signal <= config.grad_gate * reference)
        change = torch.where(open_, step, torch.zeros_like(step))
    else:  # pragma: no cover - the enum is closed
        raise ValueError(f"unknown grafting strategy {strategy}")
    return (alpha + change).clamp(0.0, 1.0)
