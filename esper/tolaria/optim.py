"""The optimizer and the learning-rate schedule of a run, and the rebuild that keeps state.

    optimizer = build_optimizer(model, config.optimizer)
    set_lr(optimizer, lr_at(config.schedule, config.optimizer.lr, epoch, config.epochs))
    ...
    before = SeedParameterIndex.of(model)          # before the epoch boundary moves seeds
    kasmina.on_epoch_end(model, epoch)
    optimizer = rebuild_optimizer(optimizer, model, config.optimizer, before)

One optimizer over the host's parameters and the seed parameters Kasmina says are training now
(`kasmina.seed_parameters`), in that order. A rebuild keeps the state (Adam's moments and step,
SGD's momentum buffer) of every parameter that is still there: host parameters by identity, and
seed parameters, which Kasmina re-creates whenever a seed changes stage or bank, row by row by
(layer, kernel, tensor, chunk). A seed that stops training leaves the optimizer, and one that
starts (or starts again, after STABILIZATION and EVALUATING) begins with fresh state.

The schedule is a function of the epoch alone, not a torch LRScheduler bound to one optimizer
object: a rebuilt optimizer, a resumed run and a rolled-back run all get the lr of their epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

import kasmina
from esper.tolaria.config import OptimizerConfig, ScheduleConfig


def optimizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer updates: host parameters that are not frozen (`model.freeze`), then
    training seed parameters (stable order: module order, then layer id and bank name)."""
    host = [p for p in kasmina.host_parameters(model) if p.requires_grad]
    return host + kasmina.seed_parameters(model)


def make_optimizer(params: Iterable[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    # One group even when empty: a frozen host has nothing to train until a seed does.
    params = [{"params": list(params)}]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
               weight_decay=config.weight_decay)


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    return make_optimizer(optimizer_parameters(model), config)


def lr_at(schedule: ScheduleConfig, base_lr: float, epoch: int, epochs: int) -> float:
    """The lr of epoch `epoch` (1-based) of `epochs`: `cosine` from `base_lr` at epoch 1 to
    `min_lr` at the last epoch; `step` times `gamma` every `step_size` epochs."""
    done = max(epoch - 1, 0)  # epochs completed before this one
    if schedule.name == "cosine":
        span = max(epochs - 1, 1)
        return schedule.min_lr + (base_lr - schedule.min_lr) * (1 + math.cos(math.pi * min(done, span) / span)) / 2
    if schedule.name == "step":
        return base_lr * schedule.gamma ** (done // schedule.step_size)
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class SeedParameterIndex:
    """Where each row of every seed parameter came from: (layer id, kernel id, tensor name) ->
    [(parameter, chunks)]. Taken before a boundary, so that state can follow the seeds into the
    banks Kasmina builds after it."""

    rows: dict[tuple[int, str, str], list[tuple[nn.Parameter, list[int]]]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> SeedParameterIndex:
        index = cls()
        for key, param, chunks in _seed_tensors(model):
            index.rows.setdefault(key, []).append((param, chunks))
        return index


def _seed_tensors(model: nn.Module):
    """(layer id, kernel id, tensor name), parameter, chunks: every stacked seed parameter."""
    for layer in kasmina.layers(model):
        for bank in layer.banks.values():
            for name, tensor in bank.seed_state().items():
                if isinstance(tensor, nn.Parameter):
                    yield (layer.layer_id, bank.kernel_artifact_id, name), tensor, list(bank.chunks)


def rebuild_optimizer(old: torch.optim.Optimizer, model: nn.Module, config: OptimizerConfig,
                      before: SeedParameterIndex | None = None) -> torch.optim.Optimizer:
    """A new optimizer over the model's parameters now, with the old one's lr and the state of
    every parameter that survives (see the module docstring). `before`: the seed index taken
    before the boundary that re-created seed parameters; without it, only identity carries."""
    params = optimizer_parameters(model)
    new = make_optimizer(params, config)
    for group, old_group in zip(new.param_groups, old.param_groups):
        group["lr"] = old_group["lr"]
    kept = {id(p) for p in params}
    for p in params:
        if p in old.state:
            new.state[p] = old.state[p]
    if before is None:
        return new
    for key, param, chunks in _seed_tensors(model):
        if id(param) not in kept or param in new.state:
            continue
        state = _gather_rows(old, before.rows.get(key, []), param, chunks)
        if state:
            new.state[param] = state
    return new


def _gather_rows(old: torch.optim.Optimizer, sources: list[tuple[nn.Parameter, list[int]]],
                 param: nn.Parameter, chunks: list[int]) -> dict:
    """The state of a new stacked parameter whose row i is seed chunks[i], gathered from the old
    parameters' states; rows of seeds that had none start at zero. Empty when no row had state.

    Adam keeps one `step` per tensor: when the rows come from tensors at different steps (seeds
    that started training at different times were stacked together), the largest is kept."""
    where: dict[int, tuple[dict, int]] = {}
    for source, source_chunks in sources:
        state = old.state.get(source)
        if not state:
            continue
        for row, chunk in enumerate(source_chunks):
            where[chunk] = (state, row)
    found = [where.get(c) for c in chunks]
    if not any(found):
        return {}
    template = next(f for f in found if f)[0]
    out: dict = {}
    for name, value in template.items():
        if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.dim() > 0 \
                and value.shape[1:] == param.shape[1:]:  # (seeds, *shape): one row per seed
            rows = [f[0][name][f[1]] if f else torch.zeros_like(value[0]) for f in found]
            out[name] = torch.stack(rows).to(value.dtype)
        elif isinstance(value, torch.Tensor) and value.dim() == 0:
            steps = [f[0][name] for f in found if f]
            out[name] = max(steps, key=lambda t: float(t)).clone()
        else:
            out[name] = value
    return out
