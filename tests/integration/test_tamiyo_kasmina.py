"""Tamiyo drives a real training run: a student too narrow for its teacher plateaus, Tamiyo
germinates the seed with the strongest bottleneck score, and walks it through the lifecycle
on the readiness Kasmina reports, to FOSSILIZED when the graft helps, to CULLED when the gate
asks for more than it gives. Tolaria's end-of-epoch hook is written out here as Tolaria runs it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

import kasmina
from esper.blueprints import standard_library
from esper.contracts import FieldReport, TamiyoDecision
from esper.contracts import SeedLifecycle as S
from esper.errors import IntegrityError
from esper.tamiyo import (
    FixedKernelChooser,
    TamiyoConfig,
    TamiyoController,
    build_state_packet,
)

KASMINA = {"seeds_per_layer": 2, "include": ["0"], "stabilization_steps": 5, "embargo_epochs": 2,
           "telemetry": {"every": 1, "max_rows": None},
           "training": {"objective": "gradient_match", "min_steps": 10, "ready_loss_ratio": 0.95},
           "grafting": {"ramp_length": 20}}
# A plateau every `patience` epochs: no epoch improves on the best by min_delta, so Tamiyo
# germinates as soon as warm-up and patience allow, and the gates decide the rest.
TAMIYO = {"plateau": {"patience": 2, "min_delta": 10.0, "warmup_epochs": 2}, "max_germinations": 1}


class RefusingSource(kasmina.BlueprintKernelSource):
    """The standard library's kernels, but those in `refused` fail to load, as a tampered
    artifact fails the verifying loader."""

    def __init__(self, refused: tuple[str, ...]) -> None:
        super().__init__()
        self.refused_names = refused

    def load(self, kernel_artifact_id: str, device: torch.device) -> nn.Module:
        ir, _ = self.entries[kernel_artifact_id]
        if ir.name in self.refused_names:
            raise IntegrityError(f"kernel {kernel_artifact_id}: weights.safetensors: sha256 mismatch")
        return super().load(kernel_artifact_id, device)


def train(tamiyo_config: dict, epochs: int = 22, kernels: tuple[str, ...] = ("mlp_gelu_w32",),
          refused: tuple[str, ...] = ()):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x, x_val = torch.randn(256, 8), torch.randn(128, 8)
    with torch.no_grad():
        y, y_val = teacher(x), teacher(x_val)
    # A bottleneck of 4 hidden units for a 32-unit teacher.
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4))
    source = RefusingSource(refused)
    model, report = kasmina.wrap(model, KASMINA, kernel_source=source)
    (layer,) = kasmina.layers(model)
    for name in kernels:  # the chooser ranks them in this order (latency 1, 2, ...)
        source.add(next(ir for ir in standard_library() if ir.name == name), report.layers[0].interface)
    host_count = sum(p.numel() for p in model.parameters())
    chooser = FixedKernelChooser.from_entries(source.entries)
    names = {kid: ir.name for kid, (ir, _) in source.entries.items()}
    chooser.kernels = [replace(k, latency_ms=1.0 + kernels.index(names[k.kernel_artifact_id]))
                       for k in chooser.kernels]
    tamiyo = TamiyoController(model, TamiyoConfig.from_mapping(tamiyo_config), run_id="run",
                              kernel_chooser=chooser)

    def optimizer():
        return torch.optim.Adam(kasmina.host_parameters(model) + kasmina.seed_parameters(model),
                                lr=1e-2)

    opt = optimizer()
    decisions: list[TamiyoDecision] = []
    reports: list[FieldReport] = []
    stages = []
    rejected = []
    for epoch in range(1, epochs + 1):
        # Train step.
        model.train()
        for batch, want in zip(x.split(64), y.split(64)):
            opt.zero_grad()
            loss = (model(batch) - want).square().mean()
            loss.backward()
            kasmina.observe_loss(model, loss)
            opt.step()
        # Evaluate.
        model.eval()
        with torch.no_grad():
            val_loss = (model(x_val) - y_val).square().mean().item()
        # End-of-epoch hook.
        health = [wrapped.health_signal("run", epoch) for wrapped in kasmina.layers(model)]
        packet = build_state_packet("run", epoch, health, validation_loss=val_loss,
                                    train_loss=loss.item())
        signal = tamiyo.step(packet, health)
        assert not signal.emergency_rollback_required
        kasmina.dispatch(model, signal.commands)
        boundary = kasmina.on_epoch_end(model, epoch, run_id="run")
        # Kernels load on a worker thread; settle it so readiness never arrives an epoch late.
        layer.wait_for_loads()
        tamiyo.observe_boundary(boundary)
        rejected += [r for b in boundary for r in b.rejected]
        if signal.optimizer_rebuild_required or any(b.optimizer_rebuild_required for b in boundary):
            opt = optimizer()
        decisions += tamiyo.drain_decisions()
        reports += tamiyo.drain_field_reports()
        stages.append(layer.stages)
    assert rejected == []
    return model, layer, host_count, decisions, reports, stages


def test_tamiyo_grows_a_seed_to_fossilized():
    model, layer, host_count, decisions, reports, stages = train(TAMIYO)
    (germinate,) = [d for d in decisions if d.action == "germinate"]
    seed = germinate.seed_id
    index = int(seed.split(":")[1])
    assert germinate.epoch == 3
    assert "Plateau: validation_loss" in germinate.explanation
    assert "strongest bottleneck score" in germinate.explanation
    assert "chose " + germinate.kernel_artifact_id in germinate.explanation
    seen = [s[index] for s in stages]
    for stage in (S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION,
                  S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED):
        assert stage in seen, f"{stage.value} never seen: {[s.value for s in seen]}"
    assert layer.stage(index) is S.FOSSILIZED and layer.stage(1 - index) is S.DORMANT
    (report,) = reports
    assert report.outcome is S.FOSSILIZED and report.seed_id == seed
    assert report.kernel_artifact_id == germinate.kernel_artifact_id
    assert report.post_metric < report.pre_metric  # kept because validation loss fell
    assert sum(p.numel() for p in model.parameters()) > host_count
    assert kasmina.seed_parameters(model) == []
    advances = [d.explanation for d in decisions if d.action == "advance"]
    assert any("keep: validation_loss changed by +" in a for a in advances)


def test_tamiyo_culls_a_graft_that_misses_its_gate():
    # A graft is kept only if it takes the loss down by 100 in one evaluation: it cannot.
    strict = {**TAMIYO, "gates": {"keep_min_improvement": 100.0, "max_evaluation_epochs": 1}}
    model, layer, host_count, decisions, reports, stages = train(strict, epochs=18)
    (germinate,) = [d for d in decisions if d.action == "germinate"]
    index = int(germinate.seed_id.split(":")[1])
    seen = [s[index] for s in stages]
    assert S.EVALUATING in seen and S.CULLED in seen and S.FINE_TUNING not in seen
    (cull,) = [d for d in decisions if d.action == "cull"]
    assert "inconclusive after 1 epoch(s) in EVALUATING" in cull.explanation
    (report,) = reports
    assert report.outcome is S.CULLED and report.reason in cull.explanation
    # Culled means gone: the seed is dormant again (under embargo) and the model is the host's.
    assert layer.stage(index) is S.DORMANT
    assert sum(p.numel() for p in model.parameters()) == host_count
    # The one germination of max_germinations is spent: Tamiyo says so, once.
    spent = [d for d in decisions if d.action == "wait" and "max_germinations" in d.explanation]
    assert len(spent) == 1


def test_a_kernel_that_raises_at_run_time_is_not_tried_at_another_seed():
    # attention_head_d16 wants (..., T, C) inputs; this host's are (batch, features).
    _, _, _, decisions, reports, _ = train(
        {**TAMIYO, "max_germinations": 2, "kernel": {"rank": "latency"}}, epochs=14,
        kernels=("attention_head_d16", "mlp_gelu_w32"))
    first, second = [d for d in decisions if d.action == "germinate"]
    assert reports[0].outcome is S.CULLED and reports[0].reason.startswith("runtime error:")
    assert reports[0].kernel_artifact_id == first.kernel_artifact_id
    assert second.seed_id != first.seed_id  # the first seed is under embargo...
    assert second.kernel_artifact_id != first.kernel_artifact_id  # ...and the kernel is out


def test_a_kernel_that_fails_to_load_is_not_tried_again():
    """A kernel the loader refuses (tampered) culls its seed, and Tamiyo does not choose it
    again for another seed: the next germination takes the next kernel."""
    _, _, _, decisions, reports, _ = train(
        {**TAMIYO, "max_germinations": 2, "kernel": {"rank": "latency"}}, epochs=14,
        kernels=("mlp_relu_w16", "mlp_gelu_w32"), refused=("mlp_relu_w16",))
    first, second = [d for d in decisions if d.action == "germinate"]
    assert reports[0].outcome is S.CULLED and reports[0].reason.startswith("kernel load failed:")
    assert "sha256 mismatch" in reports[0].reason
    assert reports[0].kernel_artifact_id == first.kernel_artifact_id
    assert second.seed_id != first.seed_id
    assert second.kernel_artifact_id != first.kernel_artifact_id
