"""The four grafting strategies (kasmina-migration-plan): their gates, on the device."""

from __future__ import annotations

import torch

from esper.contracts import GraftingStrategy as G
from kasmina.config import GraftingConfig
from kasmina.grafting import ramp

CONFIG = GraftingConfig(ramp_length=4, loss_tolerance=0.1, max_drift=0.5, grad_gate=2.0)
NAN = float("nan")


def test_fixed_ramp_reaches_one_in_ramp_length_steps():
    alpha = torch.zeros(3)
    for _ in range(4):
        alpha = ramp(G.FIXED_RAMP, alpha, CONFIG)
    assert alpha.tolist() == [1.0, 1.0, 1.0]
    assert ramp(G.FIXED_RAMP, alpha, CONFIG).tolist() == [1.0, 1.0, 1.0]


def test_performance_linked_backs_off_when_the_loss_worsens():
    alpha = torch.full((3,), 0.5)
    reference = torch.tensor([1.0, 1.0, NAN])
    better = ramp(G.PERFORMANCE_LINKED, alpha, CONFIG, loss=torch.tensor(1.05), reference=reference)
    worse = ramp(G.PERFORMANCE_LINKED, alpha, CONFIG, loss=torch.tensor(1.5), reference=reference)
    assert better.tolist() == [0.75, 0.75, 0.75]
    assert worse.tolist() == [0.25, 0.25, 0.75]  # no reference yet: the gate is open


def test_drift_controlled_holds_while_the_seed_dominates_its_chunk():
    alpha = torch.full((3,), 0.5)
    new = ramp(G.DRIFT_CONTROLLED, alpha, CONFIG, signal=torch.tensor([0.1, 0.9, NAN]))
    assert new.tolist() == [0.75, 0.5, 0.75]


def test_grad_norm_gated_holds_while_gradients_spike():
    alpha = torch.full((3,), 0.5)
    new = ramp(G.GRAD_NORM_GATED, alpha, CONFIG, signal=torch.tensor([1.0, 5.0, 5.0]),
               reference=torch.tensor([1.0, 1.0, NAN]))
    assert new.tolist() == [0.75, 0.5, 0.75]
