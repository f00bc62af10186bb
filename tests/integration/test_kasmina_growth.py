"""A small training run grows a seed through the whole lifecycle, driven only by queued
commands at epoch boundaries and the readiness read from HealthSignals, as Tamiyo would."""

from __future__ import annotations

import torch
from torch import nn

import kasmina
from esper.blueprints import standard_library
from esper.contracts import (
    GraftingStrategy,
    HealthSignal,
    KasminaCommandType,
    KasminaControlCommand,
)
from esper.contracts import SeedLifecycle as S

NEXT = {S.TRAINING: S.GRAFTING, S.GRAFTING: S.STABILIZATION, S.STABILIZATION: S.EVALUATING,
        S.EVALUATING: S.FINE_TUNING, S.FINE_TUNING: S.FOSSILIZED}


def test_a_seed_grows_from_dormant_to_fossilized_under_commands():
    torch.manual_seed(0)
    # A narrow bottleneck the task needs more of: y = W2 relu(W1 x) with 2 hidden units.
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(256, 8)
    with torch.no_grad():
        target = teacher(x)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4))
    source = kasmina.BlueprintKernelSource()
    config = {"seeds_per_layer": 2, "include": ["0"], "stabilization_steps": 5,
              "telemetry": {"every": 1, "max_rows": None},
              "training": {"objective": "gradient_match", "min_steps": 10, "ready_loss_ratio": 0.95},
              "grafting": {"ramp_length": 20}}
    model, report = kasmina.wrap(model, config, kernel_source=source)
    (layer,) = kasmina.layers(model)
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w32")
    kernel = source.add(ir, report.layers[0].interface)
    host_count = sum(p.numel() for p in model.parameters())

    def optimizer():
        return torch.optim.Adam(kasmina.host_parameters(model) + kasmina.seed_parameters(model), lr=1e-2)

    def command(kind, **kw):
        return KasminaControlCommand(command_id=f"{kind.value}-{len(history)}", run_id="run", target_layer_id=0,
                                     target_seed_id=1, command=kind, **kw)

    opt = optimizer()
    history: list[S] = []
    losses = []
    fossil_weights = None
    for epoch in range(1, 31):
        for batch, want in zip(x.split(64), target.split(64)):
            opt.zero_grad()
            loss = (model(batch) - want).square().mean()
            loss.backward()
            kasmina.observe_loss(model, loss)
            opt.step()
        losses.append(loss.item())
        signal: HealthSignal = layer.health_signal(run_id="run", epoch=epoch)
        stage, ready = signal.lifecycle[1], signal.is_ready_for_transition[1]
        history.append(stage)
        commands = []
        if stage is S.DORMANT and epoch == 2:
            commands.append(command(KasminaCommandType.REQUEST_GERMINATION, kernel_artifact_id=kernel,
                                    grafting_strategy=GraftingStrategy.PERFORMANCE_LINKED))
        elif stage is S.GERMINATED and ready:
            commands.append(command(KasminaCommandType.ADVANCE, target_stage=S.LOADING))
        elif stage in NEXT and ready:
            commands.append(command(KasminaCommandType.ADVANCE, target_stage=NEXT[stage]))
        elif stage is S.LOADING:
            layer.wait_for_loads()
        kasmina.dispatch(model, commands)
        boundary = kasmina.on_epoch_end(model, epoch, run_id="run")[0]
        # Kernels are fetched on a worker thread; under load a fetch can outlast an epoch, so the
        # test settles it here rather than racing it (readiness would arrive an epoch late).
        layer.wait_for_loads()
        assert boundary.rollback_requested is None and not boundary.rejected
        if boundary.optimizer_rebuild_required:
            opt = optimizer()
        if layer.stage(1) is S.FOSSILIZED and fossil_weights is None:
            fossil_weights = [p.detach().clone() for p in layer.parameter_groups()[S.FOSSILIZED]]
            stop = epoch + 2  # two more epochs of training with the seed fossilized
        if fossil_weights is not None and epoch == stop:
            break

    print([h.value for h in history])
    assert history[:4] == [S.DORMANT, S.DORMANT, S.GERMINATED, S.LOADING]
    assert S.TRAINING in history and S.GRAFTING in history and S.EVALUATING in history
    assert layer.stage(1) is S.FOSSILIZED and layer.stage(0) is S.DORMANT
    assert float(layer.state.alpha[1]) == 1.0
    assert sum(p.numel() for p in model.parameters()) > host_count
    assert kasmina.seed_parameters(model) == []  # frozen for good
    for before, after in zip(fossil_weights, layer.parameter_groups()[S.FOSSILIZED]):
        assert torch.equal(before, after)
    assert losses[-1] < losses[0]
