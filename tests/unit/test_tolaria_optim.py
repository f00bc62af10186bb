"""The optimizer rebuild keeps the state of every parameter that survives it (growth invariant):
host parameters by identity, seed parameters row by row when Kasmina re-creates them at a
stage change. And the lr schedule is a function of the epoch alone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kasmina
from esper.blueprints import standard_library
from esper.contracts import SeedLifecycle as S
from esper.tolaria.config import OptimizerConfig, ScheduleConfig
from esper.tolaria.optim import (
    SeedParameterIndex,
    build_optimizer,
    lr_at,
    optimizer_parameters,
    rebuild_optimizer,
)


def _wrapped(seeds: int = 2):
    torch.manual_seed(0)
    source = kasmina.BlueprintKernelSource()
    model, report = kasmina.wrap(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
                                 {"include": ["0"], "seeds_per_layer": seeds,
                                  "training": {"min_steps": 1}},
                                 kernel_source=source)
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    kernel = source.add(ir, report.layers[0].interface)
    return model, kasmina.layers(model)[0], kernel


def _train(model, optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        optimizer.step()


def _to_training(layer, seed: int, kernel: str) -> None:
    layer.transition(seed, S.GERMINATED, kernel_artifact_id=kernel)
    layer.transition(seed, S.LOADING)
    layer.transition(seed, S.TRAINING)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_a_rebuild_keeps_the_state_of_host_parameters(name):
    """A seed starts training: the new optimizer holds its parameters with fresh state, and every
    host parameter's state is the very state the old optimizer had, so the next step is the one
    the old optimizer would have taken."""
    config = OptimizerConfig(name=name, lr=1e-2, **({"momentum": 0.9} if name == "sgd" else {}))
    model, layer, kernel = _wrapped()
    optimizer = build_optimizer(model, config)
    _train(model, optimizer)
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
              for p in kasmina.host_parameters(model)}
    index = SeedParameterIndex.of(model)
    _to_training(layer, 0, kernel)
    assert kasmina.seed_parameters(model)  # parameters came into existence
    rebuilt = rebuild_optimizer(optimizer, model, config, index)
    assert [id(p) for p in rebuilt.param_groups[0]["params"]] == [id(p) for p in optimizer_parameters(model)]
    for p in kasmina.host_parameters(model):
        assert rebuilt.state[p].keys() == before[id(p)].keys()
        assert all(torch.equal(rebuilt.state[p][k], before[id(p)][k]) for k in before[id(p)])
    assert all(p not in rebuilt.state for p in kasmina.seed_parameters(model))


def test_host_updates_after_a_rebuild_are_bit_identical_to_the_old_optimizers():
    """With nothing added, the rebuilt optimizer steps exactly as the old one would have."""
    config = OptimizerConfig(name="adamw", lr=1e-2, weight_decay=1e-3)
    model, _, _ = _wrapped()
    twin = _wrapped()[0]
    twin.load_state_dict(model.state_dict())
    a, b = build_optimizer(model, config), build_optimizer(twin, config)
    _train(model, a)
    _train(twin, b)
    a = rebuild_optimizer(a, model, config, SeedParameterIndex.of(model))
    _train(model, a)
    _train(twin, b)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_seed_state_follows_the_seed_into_its_next_bank():
    """TRAINING -> GRAFTING re-creates the seed's stacked parameters (a new bank); its Adam
    moments and step move with it, row by row, while the seed that stays behind keeps its own."""
    config = OptimizerConfig(name="adam", lr=1e-2)
    model, layer, kernel = _wrapped()
    _to_training(layer, 0, kernel)
    _to_training(layer, 1, kernel)
    optimizer = build_optimizer(model, config)
    _train(model, optimizer)
    (bank,) = layer.banks.values()
    assert bank.chunks == [0, 1]
    old = {name: {k: v.clone() for k, v in optimizer.state[t].items()}
           for name, t in bank.seed_state().items() if isinstance(t, nn.Parameter)}
    index = SeedParameterIndex.of(model)
    layer.transition(0, S.GRAFTING)  # seed 0 moves to a bank of its own; seed 1 stays
    rebuilt = rebuild_optimizer(optimizer, model, config, index)
    banks = {b.stage: b for b in layer.banks.values()}
    for stage, row in ((S.GRAFTING, 0), (S.TRAINING, 1)):
        for name, t in banks[stage].seed_state().items():
            if not isinstance(t, nn.Parameter):
                continue
            state = rebuilt.state[t]
            assert torch.equal(state["exp_avg"], old[name]["exp_avg"][row:row + 1])
            assert torch.equal(state["exp_avg_sq"], old[name]["exp_avg_sq"][row:row + 1])
            assert torch.equal(state["step"], old[name]["step"])
    _train(model, rebuilt)  # and it steps


def test_a_seed_that_stops_training_leaves_the_optimizer():
    config = OptimizerConfig(name="adam", lr=1e-2)
    model, layer, kernel = _wrapped()
    _to_training(layer, 0, kernel)
    optimizer = build_optimizer(model, config)
    _train(model, optimizer)
    index = SeedParameterIndex.of(model)
    layer.transition(0, S.CULLED)
    rebuilt = rebuild_optimizer(optimizer, model, config, index)
    assert kasmina.seed_parameters(model) == []
    assert len(rebuilt.param_groups[0]["params"]) == len(kasmina.host_parameters(model))


def test_lr_schedules_are_functions_of_the_epoch():
    assert lr_at(ScheduleConfig(), 0.1, 7, 10) == 0.1
    cosine = ScheduleConfig(name="cosine", min_lr=0.01)
    assert lr_at(cosine, 0.1, 1, 11) == pytest.approx(0.1)
    assert lr_at(cosine, 0.1, 6, 11) == pytest.approx(0.055)
    assert lr_at(cosine, 0.1, 11, 11) == pytest.approx(0.01)
    step = ScheduleConfig(name="step", step_size=3, gamma=0.5)
    assert [lr_at(step, 0.1, e, 10) for e in (1, 3, 4, 7)] == [0.1, 0.1, 0.05, 0.025]
    assert all(math.isfinite(lr_at(cosine, 0.1, e, 1)) for e in (1, 2))
