"""A trained model on disk, loadable without the workspace: `esper.save_model`, `esper.load_model`,
and the run's lineage.

    esper.save_model(model, "outputs/evolved")      # model.safetensors + model.json (+ lineage.json)
    model = esper.load_model("outputs/evolved")     # rebuilt by the builders alone

`model.json` holds what rebuilding takes: the host model's config (zoo name or import path,
kwargs, input shape, output width), the Kasmina config that wrapped it, and every kernel a seed
holds, as its blueprint IR (plain JSON, no code) and interface. `load_model` builds the host,
wraps it with that config, builds each seed's module from its IR with `esper.blueprints.build`,
and loads the weights: no catalog, no forge artifact, no signature is needed, and nothing is
unpickled. A host model that is not from the zoo or an import path (an SDK user's own instance)
is passed back in: `load_model(path, host=MyModel())`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from safetensors.torch import load, save_file
from torch import nn

import kasmina
from esper._fs import atomic_write_text, fsync_dir
from esper.contracts import (
    FieldReport,
    KernelInterface,
    SeedLifecycle,
    describe_validation_error,
    seed_id,
)
from esper.errors import BadInputError, EsperError, IntegrityError, NotFoundError
from kasmina.lifecycle import HAS_KERNEL

MODEL_FORMAT = "esper.model/1"
LINEAGE_FORMAT = "esper.lineage/1"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "model.json"
LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class ModelOrigin:
    """How the host model was built: enough for `build_model` to build it again."""

    model: dict[str, Any]          # the run config's `model` section (name, kwargs)
    input_shape: tuple[int, ...]
    out_dim: int
    task: str = "classification"


# What the trainer knows about a model that save_model cannot see on the module itself.
_ORIGINS: weakref.WeakKeyDictionary[nn.Module, ModelOrigin] = weakref.WeakKeyDictionary()
_LINEAGE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def remember_origin(model: nn.Module, origin: ModelOrigin) -> None:
    _ORIGINS[model] = origin


def remember_lineage(model: nn.Module, lineage: dict) -> None:
    _LINEAGE[model] = lineage


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(weights, architecture): `dir/` gives dir/model.safetensors and dir/model.json;
    `name.safetensors` gives itself and name.json."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_FILE, path / ARCHITECTURE_FILE


# --- saving ---------------------------------------------------------------------------------

def save_model(model: nn.Module, path: str | os.PathLike[str], *,
               metadata: Mapping[str, Any] | None = None) -> Path:
    """Save the model's weights (safetensors) and architecture (JSON) under `path`, a directory
    (or a `.safetensors` file name); and its lineage, when the model came out of a
    TolariaTrainer. Each file is written atomically. Returns the weights' path."""
    weights_path, architecture_path = _paths(path)
    architecture = model_architecture(model)
    state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=weights_path.parent, prefix=f".{weights_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": MODEL_FORMAT})
        digest = hashlib.sha256()
        with open(tmp, "rb+") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, weights_path)
        fsync_dir(weights_path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    architecture["weights"] = {"file": weights_path.name, "sha256": digest.hexdigest()}
    architecture["metadata"] = dict(metadata or {})
    atomic_write_text(architecture_path, json.dumps(architecture, indent=2, sort_keys=True) + "\n")
    lineage = _LINEAGE.get(model)
    if lineage is not None:
        atomic_write_text(weights_path.parent / LINEAGE_FILE, json.dumps(lineage, indent=2) + "\n")
    return weights_path


def model_architecture(model: nn.Module) -> dict[str, Any]:
    """model.json without the weights' hash: host origin, Kasmina config, kernels, seeds."""
    found = kasmina.layers(model)
    origin = _ORIGINS.get(model)
    kernels: dict[str, dict[str, Any]] = {}
    seeds = []
    for layer in found:
        for index, stage in enumerate(layer.stages):
            kernel = layer.kernel_of(index)
            if stage is SeedLifecycle.DORMANT:
                continue
            seeds.append({"seed_id": seed_id(layer.layer_id, index), "layer": layer.layer_name,
                          "stage": stage.value, "kernel_artifact_id": kernel})
            if stage in HAS_KERNEL and kernel is not None and kernel not in kernels:
                kernels[kernel] = _kernel_entry(layer, kernel)
    return {
        "format": MODEL_FORMAT,
        "model": None if origin is None else origin.model,
        "input_shape": None if origin is None else list(origin.input_shape),
        "out_dim": None if origin is None else origin.out_dim,
        "task": None if origin is None else origin.task,
        "kasmina": found[0].config.model_dump(mode="json") if found else None,
        "kernels": kernels,
        "seeds": seeds,
        "parameters": {"total": sum(p.numel() for p in model.parameters()),
                       "host": sum(p.numel() for p in kasmina.host_parameters(model))},
    }


def _kernel_entry(layer: kasmina.KasminaLayer, kernel_id: str) -> dict[str, Any]:
    """A kernel's blueprint IR and interface, from the kernel source the layer loaded it with:
    the IR itself for a BlueprintKernelSource, the workspace's catalog for the verifying
    loader."""
    from esper.blueprints import blueprint_id, canonical_json
    from pipelines.tezzeret.loader import VerifiedKernelSource

    source = layer.cache.source if layer.cache is not None else None
    if isinstance(source, kasmina.BlueprintKernelSource) and kernel_id in source.entries:
        ir, _ = source.entries[kernel_id]
        ir_bytes = canonical_json(ir)
        bp = blueprint_id(ir)
    elif isinstance(source, VerifiedKernelSource):
        from esper.urza import Urza

        with Urza.open(source.workspace) as urza:
            bp = urza.get_kernel(kernel_id).blueprint_id
            ir_bytes = urza.blueprint_ir(bp)
    else:
        raise EsperError(f"cannot save kernel {kernel_id} of layer {layer.layer_name or layer.layer_id}: "
                         "its blueprint IR is unknown (load kernels through a workspace or a "
                         "kasmina.BlueprintKernelSource)")
    return {"blueprint_id": bp, "interface": str(layer.seed_interface), "ir": json.loads(ir_bytes)}


# --- loading --------------------------------------------------------------------------------

def load_model(path: str | os.PathLike[str], *, host: nn.Module | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_model` (or a run's `runs/<id>/`), in eval mode on `device`.

    The host is built from model.json's config, or given as `host` (an unwrapped instance of the
    same architecture). IntegrityError if the weights are not the file model.json names or a
    kernel's IR is not its blueprint."""
    from esper.blueprints import blueprint_id, load_ir
    from esper.tolaria.models import build_model
    from kasmina.config import KasminaConfig

    weights_path, architecture_path = _paths(path)
    if not architecture_path.is_file() or not weights_path.is_file():
        raise NotFoundError(f"{path}: no saved model ({WEIGHTS_FILE} and {ARCHITECTURE_FILE})")
    try:
        architecture = json.loads(architecture_path.read_text())
    except ValueError as e:
        raise BadInputError(f"{architecture_path}: not JSON ({e})") from None
    if not isinstance(architecture, dict) or architecture.get("format") != MODEL_FORMAT:
        raise BadInputError(f"{architecture_path}: not a saved Esper model ({MODEL_FORMAT})")
    data = weights_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != architecture["weights"]["sha256"]:
        raise IntegrityError(f"{weights_path}: not the weights {architecture_path.name} names "
                             "(sha256 differs)")
    if host is None:
        if architecture["model"] is None:
            raise BadInputError(f"{architecture_path}: the host model was not built from a config; "
                                "pass it: load_model(path, host=MyModel(...))")
        with torch.random.fork_rng(devices=[]):  # initial weights are overwritten: leave the RNG be
            host = build_model(architecture["model"], architecture["input_shape"], architecture["out_dim"])
    entries = {}
    for kernel_id, entry in architecture["kernels"].items():
        ir = load_ir(json.dumps(entry["ir"]), source=f"{architecture_path.name}: kernel {kernel_id}")
        if blueprint_id(ir) != entry["blueprint_id"]:
            raise IntegrityError(f"{architecture_path}: kernel {kernel_id}'s IR is not blueprint "
                                 f"{entry['blueprint_id'][:12]}")
        entries[kernel_id] = (ir, KernelInterface.parse(entry["interface"]))
    model = host
    if architecture["kasmina"] is not None:
        model, _ = kasmina.wrap(host, KasminaConfig.model_validate(architecture["kasmina"]),
                                kernel_source=kasmina.BlueprintKernelSource(entries),
                                check_patterns=False)  # as it was made, by whichever version
    model.load_state_dict(load(data))
    model.to(device)
    model.eval()
    if architecture["model"] is not None:
        _ORIGINS[model] = ModelOrigin(architecture["model"], tuple(architecture["input_shape"]),
                                      architecture["out_dim"], architecture["task"])
    return model


# --- lineage --------------------------------------------------------------------------------

def build_lineage(model: nn.Module, field_reports: Sequence[FieldReport], *, run_id: str,
                  metric: str, urza: Any = None) -> dict[str, Any]:
    """Every adaptation fossilized in `model`, with its kernel, blueprint, epochs, the metric
    before and after, and (with the run's catalog) the audit-log rows of its kernel, blueprint
    and field report: the hash chain `esper library verify` checks. Other outcomes are listed
    after, in order."""
    fossilized = []
    for layer in kasmina.layers(model):
        for index, stage in enumerate(layer.stages):
            if stage is not SeedLifecycle.FOSSILIZED:
                continue
            sid, kernel = seed_id(layer.layer_id, index), layer.kernel_of(index)
            report = next((r for r in reversed(field_reports) if r.seed_id == sid
                           and r.kernel_artifact_id == kernel
                           and r.outcome is SeedLifecycle.FOSSILIZED), None)
            bank = next((b for b in layer.banks.values() if index in b.chunks), None)
            entry: dict[str, Any] = {
                "seed_id": sid, "layer": layer.layer_name, "interface": str(layer.seed_interface),
                "kernel_artifact_id": kernel,
                "blueprint_id": report.blueprint_id if report else
                getattr(getattr(bank, "template", None), "blueprint_id", None),
                "metric": metric,
                "parameters": sum(t[0].numel() for t in bank.seed_state().values()) if bank else 0,
            }
            if report is not None:
                epochs = int(report.eval_metrics.get("epochs", 0))
                entry |= {"germinated_epoch": report.epoch - epochs, "fossilized_epoch": report.epoch,
                          "pre_metric": report.pre_metric, "post_metric": report.post_metric,
                          "field_report_id": report.report_id, "reason": report.reason}
            if urza is not None:
                entry |= _audit(urza, kernel, entry["blueprint_id"],
                                report.report_id if report else None)
            fossilized.append(entry)
    others = [{"seed_id": r.seed_id, "kernel_artifact_id": r.kernel_artifact_id,
               "blueprint_id": r.blueprint_id, "outcome": r.outcome.value, "epoch": r.epoch,
               "pre_metric": r.pre_metric, "post_metric": r.post_metric, "reason": r.reason,
               "field_report_id": r.report_id}
              for r in field_reports if r.outcome is not SeedLifecycle.FOSSILIZED]
    return {"format": LINEAGE_FORMAT, "run_id": run_id, "adaptations": fossilized,
            "other_outcomes": others}


def _audit(urza: Any, kernel_id: str, blueprint: str | None, report_id: str | None) -> dict[str, Any]:
    """The catalog's evidence for one adaptation: the kernel's signed manifest hash, and the
    audit rows (with their chain hashes) about the kernel, its blueprint and the field report."""
    subjects = [s for s in (kernel_id, blueprint, report_id) if s]
    try:
        artifact = urza.get_kernel(kernel_id)
    except EsperError:
        return {"audit": [], "manifest_sha256": None}
    audit = [{k: r[k] for k in ("seq", "at", "actor", "action", "subject", "row_hash", "details")}
             for r in urza.audit_rows(subjects=subjects)]
    return {"manifest_sha256": artifact.kernel_binary_ref, "audit": audit}


class _LineageFields(BaseModel):
    """The fields a reader uses, strictly typed; others, and fields added later, pass."""

    model_config = ConfigDict(extra="allow", strict=True)


class LineageCitation(_LineageFields):
    seq: int
    row_hash: str


class LineageAdaptation(_LineageFields):
    seed_id: str
    kernel_artifact_id: str
    layer: str = ""
    metric: str = ""
    germinated_epoch: int = 0
    fossilized_epoch: int = 0
    pre_metric: float = 0.0
    post_metric: float = 0.0
    parameters: int = 0
    audit: list[LineageCitation] = []

    @model_validator(mode="after")
    def _metrics_in_pairs(self) -> LineageAdaptation:
        if len({"pre_metric", "post_metric"} & self.model_fields_set) == 1:
            raise ValueError("pre_metric and post_metric come together")
        return self


class LineageOutcome(_LineageFields):
    seed_id: str
    kernel_artifact_id: str
    outcome: str
    epoch: int
    reason: str = ""


class LineageRecord(_LineageFields):
    run_id: str = ""
    adaptations: list[LineageAdaptation]
    other_outcomes: list[LineageOutcome] = []


def read_lineage(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's lineage.json as written, once its shape is checked: a file that is not JSON or
    holds the wrong types is a BadInputError naming it (and the field), not a reader's crash."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: not a lineage file ({e})") from None
    try:
        LineageRecord.model_validate(record)
    except ValidationError as e:
        raise BadInputError(describe_validation_error(e, "lineage file", str(path))) from None
    return record


__all__ = ["ModelOrigin", "build_lineage", "load_model", "model_architecture", "read_lineage",
           "remember_lineage", "remember_origin", "save_model"]
