"""Kernels for tests, made the way the forge makes them.

- `blueprint`, `kernel`: catalog entries only (a forge-signed manifest blob, no artifact files),
  for tests of the catalog and of stages that read reports, never artifacts;
- `plant`: a real artifact built through the forge's own path (`compile_job`, then `seal` with
  the workspace's forge key), whose weights `edit` may rewrite first (planted faults).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from safetensors.torch import load_file, save_file

from esper.blueprints import canonical_json, load_ir, standard_library
from esper.contracts import (
    Blueprint,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
    LayerKind,
)
from esper.signing import sign
from esper.urza import Urza
from pipelines.tezzeret.artifact import seal
from pipelines.tezzeret.compile import WEIGHTS_FILE, CompileJob, compile_job


def blueprint(urza: Urza, name: str, kind: LayerKind = LayerKind.LINEAR) -> Blueprint:
    ir = json.dumps({"name": name, "kind": kind.value}, sort_keys=True).encode()
    return urza.add_blueprint(ir, name=name, interface_kind=kind, actor="test")[0]


def kernel(urza: Urza, bp: Blueprint, *, interface: str = "linear:64:32", target: str = "cpu",
           dtype: str = "float32", pipeline: CompilationPipeline = CompilationPipeline.FAST,
           tags: tuple[str, ...] = (), variant: str = "") -> CompiledKernelArtifact:
    """Register a compiled artifact the way the forge does: manifest blob first, then the row."""
    config = hashlib.sha256(f"{interface}/{dtype}/{variant}".encode()).hexdigest()[:6]
    artifact = CompiledKernelArtifact(
        id=f"{bp.id[:12]}-{target}-{pipeline.value}-{config}", blueprint_id=bp.id,
        compilation_pipeline=pipeline, interface=KernelInterface.parse(interface), target=target,
        dtype=dtype, toolchain_hash="0badc0de",
        kernel_binary_ref=urza.store.put(sign(
            f"manifest of {bp.id} {interface} {target} {dtype} {pipeline.value} {variant}".encode(),
            urza.workspace.private_key("forge"), signer="forge")),
        tags=list(tags))
    added, created = urza.add_kernel(artifact, actor="forge")
    assert created
    return added


def mlp_ir(name: str, hidden: int, act: str = "relu") -> dict:
    return {"format": "esper.blueprint/1", "name": name, "interface_kind": "linear",
            "nodes": [{"id": "x", "op": "input"},
                      {"id": "hidden", "op": "linear", "inputs": ["x"], "attrs": {"out": hidden}},
                      {"id": "act", "op": act, "inputs": ["hidden"]},
                      {"id": "proj", "op": "linear", "inputs": ["act"], "attrs": {"out": "out"}},
                      {"id": "y", "op": "output", "inputs": ["proj"]}]}


def wide_conv_ir() -> dict:
    """Two 3x3 convolutions 256 channels wide: ~40 GFLOP per profiling forward pass."""
    return {"format": "esper.blueprint/1", "name": "wide_conv3x3_c256", "interface_kind": "conv2d",
            "nodes": [{"id": "x", "op": "input"},
                      {"id": "c1", "op": "conv3x3", "inputs": ["x"], "attrs": {"out": 256}},
                      {"id": "act", "op": "relu", "inputs": ["c1"]},
                      {"id": "c2", "op": "conv3x3", "inputs": ["act"], "attrs": {"out": "out"}},
                      {"id": "y", "op": "output", "inputs": ["c2"]}]}


def plant(urza: Urza, tmp_path, ir, interface: str, edit=None) -> str:
    """Build a kernel through the forge's path; `edit(state)` rewrites its weights first."""
    if isinstance(ir, dict):
        ir = load_ir(json.dumps(ir))
    ir_bytes = canonical_json(ir)
    blueprint, _ = urza.add_blueprint(ir_bytes, name=ir.name, interface_kind=ir.interface_kind,
                                      actor="test")
    job = CompileJob(blueprint_id=blueprint.id, ir_json=ir_bytes,
                     interface=KernelInterface.parse(interface), device="cpu", dtype="float32",
                     pipeline=CompilationPipeline.FAST)
    out = tmp_path / f"{ir.name}-{interface.replace(':', '_')}"
    result = compile_job(job, out)
    if edit is not None:
        path = out / WEIGHTS_FILE
        state = load_file(path)
        edit(state)
        save_file(state, path)
        result = replace(result, files={**result.files,
                                        WEIGHTS_FILE: hashlib.sha256(path.read_bytes()).hexdigest()})
    artifact = seal(job, result, out, urza, urza.workspace.private_key("forge"))
    urza.add_kernel(artifact, actor="test")
    return artifact.id


def library_ir(name: str):
    return next(ir for ir in standard_library() if ir.name == name)
