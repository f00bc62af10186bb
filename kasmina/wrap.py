"""`wrap(model, config)`: replace the configured modules with KasminaLayers (DESIGN.md 10).

Targets are chosen by type (default every nn.Linear; nn.Conv2d on request) or by module path
(globs on the dotted path, or `re:` regular expressions, HLD Appendix I style), plus named
blocks with a declared interface. The wrapped model computes exactly what it computed before
until a seed is grafted.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esper.contracts import KasminaControlCommand, KernelInterface, LayerKind
from esper.errors import BadInputError
from kasmina.cache import KernelCache, KernelSource
from kasmina.config import BlockSpec, KasminaConfig
from kasmina.layer import BoundaryReport, KasminaLayer


@dataclass(frozen=True)
class WrappedLayer:
    layer_id: int
    path: str
    kind: LayerKind
    seeds: int
    chunk_width: int
    interface: KernelInterface  # what each seed's kernel plugs into: host in -> chunk width


@dataclass
class WrapReport:
    layers: list[WrappedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def interfaces(self) -> list[KernelInterface]:
        """The distinct seed interfaces, for the forge to compile kernels for."""
        return sorted({layer.interface for layer in self.layers}, key=str)

    @property
    def seeds(self) -> int:
        return sum(layer.seeds for layer in self.layers)


def _matches(path: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


TARGET_TYPES = {"linear": nn.Linear, "conv2d": nn.Conv2d}


def _some(paths: list[str]) -> str:
    return ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")


def _check_patterns(config: KasminaConfig, modules: dict[str, nn.Module]) -> None:
    """Every include, exclude and blocks pattern must match a module it could select: a typo
    would train without the seeds it asked for, or with the ones it meant to keep out. Patterns
    match one module's own path, so an exclude that names only a container excludes nothing."""
    types = tuple(TARGET_TYPES[t] for t in config.targets)
    # A layer wrapped before counts as its host: wrapping again with the same include is fine.
    targets = [p for p, m in modules.items()
               if isinstance(m.host if isinstance(m, KasminaLayer) else m, types)]
    blocks = [p for p in modules if any(_matches(p, pattern) for pattern in config.blocks)]
    # `targets: []` is "no seeds but the blocks": include (it narrows the targets) has nothing
    # to select, and exclude nothing to keep out unless there are blocks.
    for pattern in config.include if config.targets else ():
        if not any(_matches(p, pattern) for p in targets):
            raise BadInputError(f"field 'kasmina.include': {pattern!r} matches no "
                                f"{'/'.join(config.targets)} module of the model (it has "
                                f"{_some(targets) or 'none'})")
    for pattern in config.exclude if config.targets or config.blocks else ():
        if not any(_matches(p, pattern) for p in targets + blocks):
            raise BadInputError(f"field 'kasmina.exclude': {pattern!r} matches no module kasmina "
                                f"selects (it selects {_some(targets + blocks) or 'none'})")
    for pattern in config.blocks:
        if not any(_matches(p, pattern) for p in modules if p):
            raise BadInputError(f"field 'kasmina.blocks': {pattern!r} matches no module of the "
                                f"model (it has {_some([p for p in modules if p])})")


def _host_interface(module: nn.Module) -> tuple[KernelInterface | None, str]:
    if isinstance(module, nn.Linear):
        return KernelInterface(kind=LayerKind.LINEAR, in_features=module.in_features,
                               out_features=module.out_features), ""
    if isinstance(module, nn.Conv2d):
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        if s[0] != s[1]:
            return None, f"conv stride {s} is not square"
        same = p == "same" or (isinstance(p, tuple) and all(
            kk % 2 == 1 and pp == (kk - 1) // 2 * dd for kk, pp, dd in zip(k, p, d)))
        if not same:
            return None, (f"conv geometry (kernel {k}, padding {p}) does not give the "
                          "ceil(size / stride) output a seed's blueprint produces")
        return KernelInterface(kind=LayerKind.CONV2D, in_features=module.in_channels,
                               out_features=module.out_channels, stride=s[0]), ""
    return None, f"{type(module).__name__} is not a supported host type"


def _weight_read_directly(parent: nn.Module | None, name: str) -> str | None:
    """Why a KasminaLayer cannot stand in for child `name` of `parent`: the parent reads that
    Linear's weight itself instead of calling it, so the wrapped model would fail (no `.weight`)
    or silently bypass the seeds. None if it calls the child."""
    if isinstance(parent, nn.MultiheadAttention) and name == "out_proj":
        return "nn.MultiheadAttention reads out_proj.weight itself"
    if (isinstance(parent, nn.TransformerEncoderLayer) and name in ("linear1", "linear2")
            and parent.self_attn.batch_first):
        return ("nn.TransformerEncoderLayer(batch_first=True) reads linear1 and linear2's weights "
                "itself on its inference fast path")
    return None


def _block_interface(path: str, module: nn.Module, spec: BlockSpec) -> KernelInterface:
    sizes = {}
    for field_name, attribute in (("in_features", "in"), ("out_features", "out")):
        size = getattr(spec, field_name)
        if size is None:
            owned = f"{attribute}_features" if spec.kind == "linear" else f"{attribute}_channels"
            size = getattr(module, owned, None)
            if not isinstance(size, int) or size <= 0:
                raise BadInputError(f"kasmina: block {path}: give its {field_name} (the "
                                    f"{type(module).__name__} has no {owned} to read it from)")
        sizes[field_name] = size
    return KernelInterface(kind=LayerKind(spec.kind), stride=spec.stride, **sizes)


def wrap(model: nn.Module, config: KasminaConfig | dict[str, Any] | None = None, *,
         kernel_source: KernelSource | None = None,
         check_patterns: bool = True) -> tuple[nn.Module, WrapReport]:
    """Wrap the configured modules of `model` in place; returns (model, report).

    `kernel_source` (the forge's verifying loader, injected by Tolaria) can also be attached
    later with `attach_kernel_source`. An include, exclude or blocks pattern that matches no
    module it could select is a BadInputError; `check_patterns=False` rebuilds a model from a
    config an earlier version ran (an export, a resumed run), which may hold one: earlier
    versions spelled "no seeds" `include: ["no-layer"]` (now `targets: []`).
    """
    if not isinstance(config, KasminaConfig):
        config = KasminaConfig.from_mapping(config)
    cache = KernelCache(kernel_source, config.cache_bytes, config.load_workers) if kernel_source else None
    report = WrapReport()
    chosen: list[tuple[str, nn.Module, KernelInterface]] = []
    claimed: list[str] = []
    # Every path of every module: a module shared by several parents (tied) is one host, wrapped
    # once and replaced at each of its paths, so the model stays tied to the one layer.
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    modules = dict(model.named_modules())
    if check_patterns:
        _check_patterns(config, modules)
    # A model wrapped before: its layers keep their ids and their hosts stay as they are.
    wrapped = [p for p, m in modules.items() if isinstance(m, KasminaLayer)]
    first_id = 1 + max((modules[p].layer_id for p in wrapped), default=-1)
    for path, module in modules.items():
        inside = next((w for w in wrapped if w == "" or path.startswith(w + ".")), None)
        if inside is not None:
            if config.include and any(_matches(path, p) for p in config.include):
                raise BadInputError(f"kasmina: cannot wrap {path}: it is inside the KasminaLayer "
                                    f"{inside or '(root)'} (the model is already wrapped there)")
            continue
        if isinstance(module, KasminaLayer) or any(path.startswith(c + ".") for c in claimed):
            continue
        excluded = any(_matches(path, p) for p in config.exclude)
        block = next((spec for pattern, spec in config.blocks.items() if _matches(path, pattern)), None)
        if block is not None and not excluded:
            chosen.append((path, module, _block_interface(path, module, block)))
            claimed.append(path)
            continue
        if not isinstance(module, tuple(TARGET_TYPES[t] for t in config.targets)) or excluded:
            continue
        explicit = bool(config.include) and any(_matches(path, p) for p in config.include)
        if config.include and not explicit:
            continue
        parent_path, _, name = path.rpartition(".")
        reason = _weight_read_directly(modules.get(parent_path), name) if path else None
        interface = None
        if reason is None:
            interface, reason = _host_interface(module)
        if interface is None:
            if explicit:
                raise BadInputError(f"kasmina: cannot wrap {path or '(root)'}: {reason}")
            report.skipped.append((path, reason))
            continue
        chosen.append((path, module, interface))
        claimed.append(path)

    layers_by_path = []
    for layer_id, (path, module, interface) in enumerate(chosen, start=first_id):
        if config.chunk_width is not None:
            if interface.out_features % config.chunk_width:
                raise BadInputError(f"kasmina: layer {path or '(root)'}: chunk_width "
                                    f"{config.chunk_width} does not divide its "
                                    f"{interface.out_features} outputs")
            seeds = interface.out_features // config.chunk_width
        else:
            seeds = config.seeds_per_layer
            if interface.out_features % seeds:
                raise BadInputError(f"kasmina: layer {path or '(root)'}: seeds_per_layer {seeds} "
                                    f"does not divide its {interface.out_features} outputs")
        layers_by_path.append((path, module, KasminaLayer(
            module, interface, seeds, layer_id=layer_id, layer_name=path, config=config,
            cache=cache)))
    # Replace only once every layer is built: a bad chunk count leaves the model untouched.
    for path, module, layer in layers_by_path:
        for alias in aliases[id(module)]:
            if alias == "":
                model = layer
            else:
                parent_path, _, name = alias.rpartition(".")
                setattr(model.get_submodule(parent_path), name, layer)
        report.layers.append(WrappedLayer(layer.layer_id, path, layer.interface.kind, layer.seeds,
                                          layer.chunk_width, layer.seed_interface))
    return model, report


def layers(model: nn.Module) -> list[KasminaLayer]:
    """The model's KasminaLayers, by layer id."""
    return sorted((m for m in model.modules() if isinstance(m, KasminaLayer)), key=lambda m: m.layer_id)


def attach_kernel_source(model: nn.Module, source: KernelSource, max_bytes: int | None = None,
                         workers: int | None = None) -> KernelCache:
    """Give every layer one shared kernel cache over `source` (Tolaria: the forge's loader)."""
    found = layers(model)
    config = found[0].config if found else KasminaConfig()
    cache = KernelCache(source, max_bytes or config.cache_bytes, workers or config.load_workers)
    for layer in found:
        layer.cache = cache
    return cache


def seed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every seed parameter an optimizer should train now (TRAINING, GRAFTING, FINE_TUNING)."""
    return [p for layer in layers(model) for p in layer.seed_parameters()]


def host_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the model that is not a seed's."""
    seeds = {id(p) for layer in layers(model) for bank in layer.banks.values() for p in bank.parameters()}
    return [p for p in model.parameters() if id(p) not in seeds]


def dispatch(model: nn.Module, commands: list[KasminaControlCommand]) -> None:
    """Queue each command on its layer (applied at the next `on_epoch_end`)."""
    by_id = {layer.layer_id: layer for layer in layers(model)}
    for command in commands:
        if command.target_layer_id not in by_id:
            raise BadInputError(f"command {command.command_id}: no layer {command.target_layer_id}")
        by_id[command.target_layer_id].queue(command)


def on_epoch_end(model: nn.Module, epoch: int | None = None, run_id: str = "") -> list[BoundaryReport]:
    return [layer.on_epoch_end(epoch, run_id) for layer in layers(model)]


def observe_loss(model: nn.Module, loss: torch.Tensor) -> None:
    for layer in layers(model):
        layer.observe_loss(loss)


@contextmanager
def seeds_disabled(model: nn.Module, seed_ids: list[str]) -> Iterator[None]:
    """Inside the block the given seeds (`layer:index`) are the identity: the 'without' half of
    EVALUATING's with/without comparison."""
    by_layer: dict[int, list[int]] = {}
    for sid in seed_ids:
        layer_id, _, index = sid.partition(":")
        by_layer.setdefault(int(layer_id), []).append(int(index))
    with ExitStack() as stack:
        for layer in layers(model):
            if layer.layer_id in by_layer:
                stack.enter_context(layer.disabled(by_layer[layer.layer_id]))
        yield


def rollback_requests(model: nn.Module) -> list[str]:
    """Reasons Kasmina asks Tolaria for an emergency rollback (corrupt seed state)."""
    return [layer.rollback_requested for layer in layers(model) if layer.rollback_requested]
