"""Kasmina loading real forge artifacts through the verifying loader: only VALIDATED, correctly
signed kernels reach the model; anything else culls its seed and training goes on."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kasmina
from esper import signing
from esper.contracts import (
    LATENCY_MS,
    MEMORY_MB,
    KasminaCommandType,
    KasminaControlCommand,
    UrabraskValidationReport,
)
from esper.contracts import SeedLifecycle as S
from esper.urza import Urza
from esper_cli.main import app
from pipelines.tezzeret.loader import VerifiedKernelSource

INTERFACE = "linear:6:4"  # a Linear(6, 8) host with 2 seeds of 4 features


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    """A workspace whose standard library was forged (fast) for the seed interface."""
    from esper.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("kasmina") / "ws")
    runner = CliRunner()
    assert runner.invoke(app, ["--workspace", str(ws.root), "library", "init"]).exit_code == 0
    result = runner.invoke(app, ["--workspace", str(ws.root), "--json", "forge", "--once",
                                 "--interface", INTERFACE, "--pipelines", "fast"])
    assert result.exit_code == 0, result.output
    return ws


def _kernel(ws, name: str) -> str:
    with Urza.open(ws) as urza:
        [blueprint] = urza.list_blueprints(name=name)
        [kernel] = urza.list_kernels(blueprint_id=blueprint.id)
        return kernel.id


def _validate(ws, kernel_id: str) -> None:
    with Urza.open(ws) as urza:
        kernel = urza.get_kernel(kernel_id)
        report = UrabraskValidationReport(
            kernel_artifact_id=kernel.id, blueprint_id=kernel.blueprint_id, passed_validation=True,
            benchmark_results={LATENCY_MS: 0.1, MEMORY_MB: 1.0})
        urza.apply_validation_report(
            signing.sign(report.to_json().encode(), ws.private_key("bench"), "bench"), actor="test")


def _germinate(model, seed: int, kernel_id: str):
    """Request germination, then LOADING; return the boundary report once the load settled."""
    layer = kasmina.layers(model)[0]

    def command(kind, **extra):
        return KasminaControlCommand(command_id=f"{kind.value}-{seed}", run_id="run",
                                     target_layer_id=0, target_seed_id=seed, command=kind, **extra)

    kasmina.dispatch(model, [command(KasminaCommandType.REQUEST_GERMINATION,
                                     kernel_artifact_id=kernel_id)])
    layer.on_epoch_end()
    kasmina.dispatch(model, [command(KasminaCommandType.ADVANCE, target_stage=S.LOADING)])
    layer.on_epoch_end()
    layer.wait_for_loads()
    return layer, layer.on_epoch_end()


def _model(ws):
    torch.manual_seed(0)
    model, report = kasmina.wrap(torch.nn.Sequential(torch.nn.Linear(6, 8)),
                                 {"seeds_per_layer": 2},
                                 kernel_source=VerifiedKernelSource(ws))
    assert str(report.layers[0].interface) == INTERFACE
    return model


def test_an_unvalidated_kernel_is_refused_and_its_seed_culled(forged):
    model = _model(forged)
    x = torch.randn(5, 6)
    before = model(x).detach().clone()
    _layer, report = _germinate(model, 0, _kernel(forged, "mlp_relu_w4"))
    assert [(t.from_stage, t.to_stage) for t in report.transitions] == [(S.LOADING, S.CULLED)]
    assert "VALIDATED" in report.incidents[0].error
    assert torch.equal(model(x), before)  # training goes on, unchanged


def test_a_validated_kernel_grafts_function_preserving(forged):
    kernel_id = _kernel(forged, "mlp_gelu_w8")
    _validate(forged, kernel_id)
    model = _model(forged)
    x = torch.randn(5, 6)
    before = model(x).detach().clone()
    layer, report = _germinate(model, 1, kernel_id)
    assert [(t.from_stage, t.to_stage) for t in report.transitions] == [(S.LOADING, S.TRAINING)]
    assert layer.seed_parameters()  # the kernel's weights are in the model now
    assert torch.equal(model(x), before)  # zero-initialised last layer: nothing changes yet


def test_a_tampered_kernel_is_refused_even_when_validated(forged):
    kernel_id = _kernel(forged, "low_rank_r2")
    _validate(forged, kernel_id)
    with Urza.open(forged) as urza:
        manifest = json.loads(json.loads(urza.store.get(urza.get_kernel(kernel_id).kernel_binary_ref))["body"])
        weights = urza.store.path_for(manifest["files"]["weights.safetensors"])
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    model = _model(forged)
    _layer, report = _germinate(model, 0, kernel_id)
    assert [(t.from_stage, t.to_stage) for t in report.transitions] == [(S.LOADING, S.CULLED)]
    assert "hash" in report.incidents[0].error or "sha256" in report.incidents[0].error


def test_each_load_is_a_fresh_module_with_exactly_the_signed_weights(forged):
    """The loader builds a cached meta skeleton per blueprint and copies it per load: two loads
    share no tensor, container or hook, and hold the signed weights bit for bit, as the builder's
    module given those weights does."""
    from safetensors.torch import load

    from esper.blueprints import build, load_ir
    from pipelines.tezzeret.artifact import Manifest

    kernel_id = _kernel(forged, "layer_norm_mlp_gelu_w16")
    _validate(forged, kernel_id)
    source = VerifiedKernelSource(forged)
    try:
        first, second = source.load(kernel_id, "cpu"), source.load(kernel_id, "cpu")
    finally:
        source.close()
    with Urza.open(forged) as urza:
        artifact = urza.get_kernel(kernel_id)
        manifest = Manifest.from_json(json.loads(urza.store.get(artifact.kernel_binary_ref))["body"])
        signed = load(urza.store.get(manifest.files["weights.safetensors"]))
        reference = build(load_ir(urza.store.get(manifest.blueprint_id)), manifest.interface, seed=0)
    reference.load_state_dict(signed)
    for module in (first, second):
        state = module.state_dict()
        assert state.keys() == signed.keys()
        assert all(torch.equal(state[name], signed[name]) for name in signed)
        assert all(p.requires_grad and not p.is_meta for p in module.parameters())
    assert not {p.data_ptr() for p in first.parameters()} & {p.data_ptr() for p in second.parameters()}
    calls = []
    first.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    x = torch.randn(3, 6)
    assert torch.equal(second(x), reference(x)) and not calls  # untouched by the first's changes
    first(x)
    assert calls == [1]


def test_a_replaced_public_key_takes_effect_on_the_next_load(forged, tmp_path):
    """Parsed keys are cached by the key file's bytes, which are read on every load."""
    from esper.errors import IntegrityError
    from esper.signing import generate_keypair

    kernel_id = _kernel(forged, "mlp_relu_w16")
    _validate(forged, kernel_id)
    source = VerifiedKernelSource(forged)
    path = forged.public_key_path("forge")
    original = path.read_bytes()
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    try:
        source.load(kernel_id, "cpu")
        path.chmod(0o644)
        path.write_bytes((tmp_path / "other.pub").read_bytes())
        with pytest.raises(IntegrityError, match="not the trusted key"):
            source.load(kernel_id, "cpu")
        path.write_bytes(original)
        assert source.load(kernel_id, "cpu") is not None
    finally:
        path.write_bytes(original)
        source.close()
