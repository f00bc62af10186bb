"""Checkpoints: whole or absent (atomic), the last N kept, tampering detected, and what they
hold (optimizer state by parameter name, every RNG) restores exactly. And a saved model loads
back with the builders alone."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from tolaria_helpers import same_state
from torch import nn

import esper
import kasmina
from esper.blueprints import standard_library
from esper.contracts import SeedLifecycle as S
from esper.errors import BadInputError, IntegrityError
from esper.tolaria.checkpoint import (
    CheckpointStore,
    capture_rng,
    load_optimizer_state,
    optimizer_state,
    restore_rng,
)
from esper.tolaria.config import OptimizerConfig
from esper.tolaria.export import ModelOrigin, remember_origin
from esper.tolaria.models import build_model
from esper.tolaria.optim import build_optimizer

ADAM = OptimizerConfig(name="adam", lr=1e-2)


def _model(kernel_source=None):
    torch.manual_seed(0)
    host = build_model("mlp", (2,), 3)
    source = kernel_source or kasmina.BlueprintKernelSource()
    model, report = kasmina.wrap(host, {"include": ["layers.1"], "seeds_per_layer": 4},
                                 kernel_source=source)
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    return model, source.add(ir, report.layers[0].interface)


def _grow(model, kernel, seed=1, to=S.TRAINING):
    layer = kasmina.layers(model)[0]
    path = [S.GERMINATED, S.LOADING, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
            S.FOSSILIZED]
    for stage in path[:path.index(to) + 1]:
        layer.transition(seed, stage, kernel_artifact_id=kernel if stage is S.GERMINATED else None)
    return layer


def _steps(model, optimizer, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 2, generator=g)).square().mean()
        loss.backward()
        optimizer.step()


def test_only_whole_checkpoints_are_listed_and_the_last_n_are_kept(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    for epoch in range(3):
        store.write(epoch, {"w": torch.full((2,), float(epoch))}, {"note": epoch})
    # What a writer killed mid-checkpoint leaves: a temporary directory, never a named one.
    crashed = tmp_path / "checkpoints" / ".tmp-ckpt-000004-999"
    crashed.mkdir()
    (crashed / "tensors.safetensors").write_bytes(b"partial")
    assert [(c.seq, c.epoch) for c in store.list()] == [(2, 1), (3, 2)]
    tensors, state = store.latest().read()
    assert torch.equal(tensors["w"], torch.full((2,), 2.0)) and state["note"] == 2
    store.write(1, {"w": torch.zeros(1)}, {})  # after a rollback: an older epoch, a newer seq
    assert store.latest().epoch == 1 and store.latest().seq == 4
    assert not crashed.exists()  # swept by the next writer


def test_a_tampered_checkpoint_is_refused(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    checkpoint = store.write(0, {"w": torch.arange(4.0)}, {})
    path = checkpoint.path / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        checkpoint.read()


def test_rng_state_restores_every_generator():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    tensors, state = capture_rng()
    state = json.loads(json.dumps(state))  # as the checkpoint stores it
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(tensors, state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_optimizer_state_by_name_restores_into_rebuilt_seed_parameters(tmp_path):
    """A fresh model loads the checkpoint (Kasmina re-creates the seed bank and its parameters);
    the optimizer state finds them by name, and both models then train identically."""
    model, kernel = _model()
    _grow(model, kernel)
    optimizer = build_optimizer(model, ADAM)
    _steps(model, optimizer)
    tensors, meta = optimizer_state(optimizer, model)
    assert any(".banks." in name for name in tensors)  # seed state is in there, by name
    tensors |= {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint = CheckpointStore(tmp_path).write(1, tensors, {"optimizer": meta})
    loaded, state = checkpoint.read()

    twin, _ = _model(kernel_source=kasmina.layers(model)[0].cache.source)
    twin.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    twin_optimizer = build_optimizer(twin, ADAM)
    load_optimizer_state(twin_optimizer, twin, loaded, json.loads(json.dumps(state["optimizer"])))
    _steps(model, optimizer, seed=2)
    _steps(twin, twin_optimizer, seed=2)
    assert same_state(model.state_dict(), twin.state_dict()) == []


def test_optimizer_state_of_another_model_is_refused(tmp_path):
    model, kernel = _model()
    optimizer = build_optimizer(model, ADAM)
    _steps(model, optimizer)
    tensors, meta = optimizer_state(optimizer, model)
    _grow(model, kernel)  # now the model has seed parameters the saved state lacks
    with pytest.raises(IntegrityError, match="other parameters"):
        load_optimizer_state(build_optimizer(model, ADAM), model, tensors, meta)


# --- save_model / load_model ----------------------------------------------------------------

def _fossilized_model():
    model, kernel = _model()
    layer = _grow(model, kernel, to=S.FOSSILIZED)
    with torch.no_grad():  # give the graft an effect (its last layer starts at zero)
        for t in next(iter(layer.banks.values())).seed_state().values():
            t.add_(0.1)
    remember_origin(model, ModelOrigin({"name": "mlp", "kwargs": {}}, (2,), 3))
    return model.eval(), kernel


def test_a_saved_model_loads_with_the_builders_alone(tmp_path):
    model, kernel = _fossilized_model()
    esper.save_model(model, tmp_path / "evolved")
    architecture = json.loads((tmp_path / "evolved" / "model.json").read_text())
    assert list(architecture["kernels"]) == [kernel]
    assert architecture["seeds"] == [{"seed_id": "0:1", "layer": "layers.1", "stage": "FOSSILIZED",
                                      "kernel_artifact_id": kernel}]
    loaded = esper.load_model(tmp_path / "evolved")
    x = torch.randn(7, 2)
    assert torch.equal(loaded(x), model(x))
    assert kasmina.layers(loaded)[0].stage(1) is S.FOSSILIZED
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_model_not_built_from_a_config_loads_given_its_host(tmp_path):
    torch.manual_seed(0)
    model, _ = kasmina.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                            {"include": ["0"], "seeds_per_layer": 2})
    path = esper.save_model(model, tmp_path / "plain.safetensors")
    assert path.name == "plain.safetensors" and (tmp_path / "plain.json").is_file()
    with pytest.raises(BadInputError, match="host="):
        esper.load_model(path)
    loaded = esper.load_model(path, host=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model.eval()(x))


def test_tampered_saved_files_are_refused(tmp_path):
    model, kernel = _fossilized_model()
    esper.save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="sha256"):
        esper.load_model(tmp_path / "m")
    weights.write_bytes(original)
    architecture_path = tmp_path / "m" / "model.json"
    architecture = json.loads(architecture_path.read_text())
    architecture["kernels"][kernel]["ir"]["name"] = "something_else"
    architecture_path.write_text(json.dumps(architecture))
    with pytest.raises(IntegrityError, match="not blueprint"):
        esper.load_model(tmp_path / "m")
