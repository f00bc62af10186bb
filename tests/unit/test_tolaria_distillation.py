"""`guard.distill`'s penalty (Learning without Forgetting on the grafts): zero while the grafts
leave the guarded outputs alone, the temperature-scaled KL divergence otherwise, blind to the
logits of classes it does not guard."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolaria_helpers import tiny_config

from esper.errors import BadInputError
from esper.tolaria.trainer import distillation


def test_zero_when_the_outputs_match_and_the_scaled_kl_otherwise():
    torch.manual_seed(0)
    host = torch.randn(6, 10)
    assert distillation(host.clone(), host, "classification", None, 1.0, 2.0).item() == 0.0
    output = (host + torch.randn(6, 10)).requires_grad_()
    got = distillation(output, host, "classification", None, 0.5, 2.0)
    p, q = F.softmax(host / 2, dim=1), F.softmax(output / 2, dim=1)
    want = 0.5 * 4 * (p * (p.log() - q.log())).sum(dim=1).mean()
    torch.testing.assert_close(got, want)
    got.backward()
    assert output.grad.abs().sum() > 0


def test_only_the_guarded_classes_count():
    torch.manual_seed(1)
    host = torch.randn(5, 10)
    own = torch.tensor([0, 1, 2, 3, 4])
    moved = host.clone()
    moved[:, 5:] += 3.0  # only the unguarded classes' logits change
    assert distillation(moved, host, "classification", own, 1.0, 2.0).item() == 0.0
    moved[:, 0] += 1.0
    assert distillation(moved, host, "classification", own, 1.0, 2.0).item() > 0


def test_a_regression_is_held_by_the_squared_error():
    host, output = torch.zeros(4, 3), torch.full((4, 3), 2.0)
    assert distillation(output, host, "regression", None, 0.25, 2.0).item() == pytest.approx(1.0)


def test_config_refuses_a_negative_weight_and_a_zero_temperature():
    guard = {"data": {"name": "two_spirals"}}
    with pytest.raises(BadInputError, match="guard.distill"):
        tiny_config(guard={**guard, "distill": -1.0})
    with pytest.raises(BadInputError, match="guard.temperature"):
        tiny_config(guard={**guard, "temperature": 0.0})
    assert tiny_config(guard=guard).guard.distill == 0.0  # off unless asked for
