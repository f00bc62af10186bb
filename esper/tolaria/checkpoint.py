"""Checkpoints of a training run: tensors in safetensors, everything else in JSON, atomically.

    runs/<id>/checkpoints/ckpt-000007-e00006/
        tensors.safetensors   model.* (the model's state_dict, Kasmina's seed state and banks
                              included), optim:<param>:<key> (optimizer state by parameter name),
                              rng.torch, rng.cuda.<i>, extra tensors (`extra.*`)
        state.json            the rest: optimizer groups and scalar state, lr schedule, numpy
                              and Python RNG, epoch, global step, Tamiyo's state, metrics so
                              far, and the sha256 of tensors.safetensors

A checkpoint is written into a temporary directory beside the others, every file fsynced, then
renamed into place (a directory rename is atomic) and the parent fsynced: a reader, a resumed run
or a rollback sees whole checkpoints only, whatever moment the writer was killed at. Names carry
a sequence number that only grows (a checkpoint written after a rollback is newer than the one it
restored, though its epoch is older); the last `keep_last` are kept. A checkpoint that does not
verify when a run resumes is renamed `<name>.damaged` and kept for its owner to look at: it is
no longer a checkpoint (neither restored, nor counted, nor pruned), and its number is not reused.

Nothing here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save_file
from torch import nn

from esper._fs import fsync_dir
from esper.errors import BadInputError, IntegrityError, NotFoundError

FORMAT = "esper.tolaria.checkpoint/1"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
_NAME = re.compile(r"^ckpt-(\d{6})-e(\d{5})$")
DAMAGED_SUFFIX = ".damaged"
_SEQ = re.compile(r"^ckpt-(\d{6})-")  # every name that took a number, whole or not, damaged or not


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint on disk."""

    path: Path
    seq: int
    epoch: int

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors on the CPU, state); IntegrityError if the tensors file is not the one the
        state names."""
        state_path, tensors_path = self.path / STATE_FILE, self.path / TENSORS_FILE
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as e:
            raise IntegrityError(f"checkpoint {self.path}: unreadable {STATE_FILE} ({e})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise IntegrityError(f"checkpoint {self.path}: not a Tolaria checkpoint ({FORMAT})")
        data = tensors_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != state.get("tensors_sha256"):
            raise IntegrityError(f"checkpoint {self.path}: {TENSORS_FILE} has sha256 {digest[:12]}, "
                                 f"the checkpoint names {str(state.get('tensors_sha256'))[:12]}")
        return load(data), state


class CheckpointStore:
    """The checkpoints of one run, oldest first."""

    def __init__(self, directory: Path, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def list(self) -> list[Checkpoint]:
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            match = _NAME.match(child.name)
            if match and (child / STATE_FILE).is_file() and (child / TENSORS_FILE).is_file():
                found.append(Checkpoint(child, int(match[1]), int(match[2])))
        return sorted(found, key=lambda c: c.seq)

    def latest(self) -> Checkpoint | None:
        found = self.list()
        return found[-1] if found else None

    def newest_verified(self) -> tuple[Checkpoint, dict[str, torch.Tensor], dict[str, Any],
                                       list[tuple[Checkpoint, IntegrityError]]]:
        """The newest checkpoint that verifies, read (tensors, state), and the newer ones that do
        not, with why; IntegrityError if none does. For --resume: `keep_last` keeps the older
        ones for exactly this."""
        damaged: list[tuple[Checkpoint, IntegrityError]] = []
        for checkpoint in reversed(self.list()):
            try:
                return (checkpoint, *checkpoint.read(), damaged)
            except IntegrityError as e:
                damaged.append((checkpoint, e))
        if not damaged:
            raise NotFoundError(f"{self.directory}: no checkpoint")
        raise IntegrityError(f"no checkpoint of {self.directory} verifies; the newest: "
                             f"{damaged[0][1]}")

    def set_aside(self, checkpoint: Checkpoint) -> Path:
        """Rename a damaged checkpoint out of the store (kept, not deleted); the new path."""
        target = checkpoint.path.with_name(checkpoint.path.name + DAMAGED_SUFFIX)
        os.replace(checkpoint.path, target)
        fsync_dir(self.directory)
        return target

    def write(self, epoch: int, tensors: Mapping[str, torch.Tensor], state: dict[str, Any]) -> Checkpoint:
        """Write a checkpoint atomically, then drop all but the newest `keep_last`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sweep()
        seq = max((int(m[1]) for c in self.directory.iterdir() if (m := _SEQ.match(c.name))),
                  default=0) + 1
        final = self.directory / f"ckpt-{seq:06d}-e{epoch:05d}"
        tmp = self.directory / f".tmp-ckpt-{seq:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            # A private copy of every tensor: safetensors refuses shared storage, and the copy
            # is what gets written even if training resumed meanwhile.
            cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
            save_file(cpu, tmp / TENSORS_FILE, metadata={"format": FORMAT})
            digest = _fsync_and_hash(tmp / TENSORS_FILE)
            body = json.dumps({**state, "format": FORMAT, "seq": seq, "epoch": epoch,
                               "tensors_sha256": digest}, sort_keys=True, allow_nan=True)
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            os.replace(tmp, final)
            fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.list()[:-self.keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)
        return Checkpoint(final, seq, epoch)

    def _sweep(self) -> None:
        """Temporary directories of writers that were killed."""
        for child in self.directory.iterdir():
            if child.name.startswith(".tmp-ckpt-"):
                shutil.rmtree(child, ignore_errors=True)


def _fsync_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


# --- RNG ------------------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a run draws from: torch's CPU generator and each initialised CUDA device's
    (tensors), numpy's and Python's global state (JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                               "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                     "python": {"version": version, "state": list(internal),
                                "gauss_next": gauss_next}}


def restore_rng(tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python from the run's seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --- optimizer ------------------------------------------------------------------------------

def parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state keyed by parameter name, not position: after a restore Kasmina has
    re-created the seed parameters, and names are what match them up."""
    names = parameter_names(model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            if id(p) not in names:
                raise BadInputError("the optimizer holds a parameter that is not the model's")
            name = names[id(p)]
            group_names.append(name)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim:{name}:{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
        groups.append({**{k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in group.items() if k != "params"}, "params": group_names})
    return tensors, {"groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                         tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
    """Load what `optimizer_state` saved into `optimizer`, whose parameters must be the same
    names in the same order."""
    names = parameter_names(model)
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    saved = [g["params"] for g in state["groups"]]
    if current != saved:
        raise IntegrityError("the checkpoint's optimizer holds other parameters than the restored "
                             f"model's ({sum(map(len, saved))} saved, {sum(map(len, current))} now)")
    index = {name: i for i, name in enumerate(n for g in saved for n in g)}
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim:"):
            _, name, field = key.split(":", 2)
            per_param.setdefault(index[name], {})[field] = value
    for name, values in state["scalars"].items():
        per_param.setdefault(index[name], {}).update(values)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in state["groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


__all__ = ["Checkpoint", "CheckpointStore", "capture_rng", "load_optimizer_state",
           "optimizer_state", "parameter_names", "restore_rng", "seed_everything"]
