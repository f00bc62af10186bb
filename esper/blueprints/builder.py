"""The builder: a validated BlueprintIR and a concrete interface -> an `nn.Module`.

Nothing is evaluated or imported from the IR: each op maps to a module through a fixed factory
table, and `forward` runs the layers in the validator's topological order. The loop over
layers unrolls at trace time with no data-dependent branch, so the module compiles with
`torch.compile(fullgraph=True)`.

Initialisation is PyTorch's default for each layer, drawn from one generator (deterministic for
a seed, and the global RNG is left untouched), except the op feeding the output, which starts at
exactly zero: a graft at any alpha is function-preserving until it learns. At the first step
only that op gets gradient; once it has moved, every parameter does.

Layers are made empty, on the meta device, without running their own initialisers (`_empty`):
`build` draws every value itself afterwards, and `build_empty` leaves them to a caller that
assigns every tensor (the verifying loader, with the signed weights). Every module is made by
`_construct`, which runs the layer's own constructor but not nn.Module's generic bookkeeping.
For a caller that assigns every tensor, `build_empty(..., unfilled=True)` makes torch's layers
without their constructors or any tensor: each holds an `Unfilled` placeholder (shape and
requires_grad) where its meta tensor would be, its state written from `_LAYER_STATES`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from esper.blueprints.budget import DEFAULT_BUDGET, Budget
from esper.blueprints.hashing import blueprint_id as ir_blueprint_id
from esper.blueprints.ir import BlueprintIR
from esper.blueprints.shapes import Resolved
from esper.blueprints.validate import check
from esper.contracts.assets import KernelInterface
from esper.contracts.enums import LayerKind

log = logging.getLogger(__name__)


def _no_values() -> None:
    pass


# What nn.Module.__init__ gives every module, and which of it are containers (dicts, sets) that
# each module needs its own copy of.
_MODULE_STATE = vars(nn.Module())
_MODULE_CONTAINERS = tuple(name for name, value in _MODULE_STATE.items()
                           if isinstance(value, (dict, set)))


def _registration_hooks(name: str):
    """torch's global registration hooks of that kind; a torch without the table counts as
    having hooks, so its modules take nn.Module's own path."""
    return getattr(_torch_module, name, True)


class _Constructing(nn.Module):
    """Put between a layer class and nn.Module while `_construct` runs the layer's constructor:
    the layer's `super().__init__()` lands here and copies a template of nn.Module's state
    (nn.Module.__init__ sets its 17 attributes one by one), and an attribute the constructor
    assigns goes straight where nn.Module.__setattr__ would put it, skipping the type checks and
    removals that a new module with no such name needs not. Anything else (a name already taken,
    a tensor, a parameter with history, global registration hooks) goes through nn.Module's own
    __setattr__."""

    def __init__(self, *args, **kwargs) -> None:
        if args or kwargs or getattr(self, "call_super_init", True):
            nn.Module.__init__(self, *args, **kwargs)
            return
        state = _MODULE_STATE.copy()
        for name in _MODULE_CONTAINERS:
            state[name] = state[name].copy()
        vars(self).update(state)

    def __setattr__(self, name: str, value) -> None:
        d = self.__dict__
        if not (name in d or name in d["_parameters"] or name in d["_buffers"]
                or name in d["_modules"] or name in d["_non_persistent_buffers_set"]):
            if type(value) is nn.Parameter:
                if (value.grad_fn is None and not hasattr(type(self), name)
                        and not _registration_hooks("_global_parameter_registration_hooks")):
                    d["_parameters"][name] = value
                    return
            elif isinstance(value, nn.Module):
                if not _registration_hooks("_global_module_registration_hooks"):
                    d["_modules"][name] = value
                    return
            elif not isinstance(value, torch.Tensor):
                object.__setattr__(self, name, value)
                return
        nn.Module.__setattr__(self, name, value)


_constructing: dict[type, type] = {}


def _uninitialised(cls: type[nn.Module]) -> nn.Module:
    """A bare instance of `cls` made as a subclass whose MRO has `_Constructing` just above
    nn.Module: whoever runs its constructor gives it its class back afterwards."""
    constructing = _constructing.get(cls)
    if constructing is None:
        constructing = _constructing[cls] = type(cls.__name__, (cls, _Constructing),
                                                 {"__module__": __name__})
    return object.__new__(constructing)


def _construct(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """`cls(*args, **kwargs)`: the same module, made by the class's own constructor, in about
    half the time (on 2 EPYC cores an empty Linear took 22 us against 39; constructors were most
    of a blueprint's build). Nothing global changes. A test holds every standard blueprint's
    module equal to the one nn.Module's own path makes."""
    module = _uninitialised(cls)
    module.__init__(*args, **kwargs)
    module.__class__ = cls
    return module


def _empty(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """`_construct(cls, *args, **kwargs)` with its tensors on the meta device and its
    `reset_parameters` not run: torch's layers draw their initial values there, which on meta
    computes nothing but took most of a build's time (about 90 us a Linear on 2 EPYC cores,
    against 30 us without). The method is shadowed on this one instance while `__init__` runs.
    Inside `build_empty(..., unfilled=True)` a layer of `_LAYER_STATES` is made by `_unfilled`."""
    if _making_unfilled.get():
        made = _unfilled(cls, args, kwargs)
        if made is not None:
            return made
    return _meta(cls, *args, **kwargs)


def _meta(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """`_empty` by the class's own constructor, on the meta device."""
    module = _uninitialised(cls)
    object.__setattr__(module, "reset_parameters", _no_values)
    module.__init__(*args, device="meta", **kwargs)
    del module.__dict__["reset_parameters"]
    module.__class__ = cls
    return module


class Unfilled(NamedTuple):
    """Where a layer made by `build_empty(..., unfilled=True)` holds a parameter or buffer: its
    shape and whether it trains. Whoever asked for such a module assigns a tensor to every one
    before anything uses it (the verifying loader, with the signed weights)."""

    shape: tuple[int, ...]
    requires_grad: bool


# What the constructor of each torch layer that the factories make gives it, for the arguments
# they pass: (attributes in the order the constructor sets them, {parameter: shape or None},
# {buffer: shape or None}). `_unfilled` writes a layer from this instead of running the
# constructor: without its meta tensors (5-6 us each on 2 EPYC cores), an empty Linear takes
# about 2 us against 19. Each class is checked against its constructor once per process (a
# torch whose constructor differs gets the constructor), and a test checks every standard
# blueprint's layers.
def _linear_state(in_features: int, out_features: int, bias: bool = True):
    return ({"in_features": in_features, "out_features": out_features},
            {"weight": (out_features, in_features), "bias": (out_features,) if bias else None},
            {})


def _conv2d_state(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                  padding: int = 0, groups: int = 1, bias: bool = True):
    if groups <= 0 or in_channels % groups or out_channels % groups:
        return None  # the constructor's own error
    attributes = {
        "in_channels": in_channels, "out_channels": out_channels,
        "kernel_size": (kernel_size, kernel_size), "stride": (stride, stride),
        "padding": (padding, padding), "dilation": (1, 1), "transposed": False,
        "output_padding": (0, 0), "groups": groups, "padding_mode": "zeros",
        "_reversed_padding_repeated_twice": (padding,) * 4,
    }
    return (attributes, {"weight": (out_channels, in_channels // groups, kernel_size, kernel_size),
                         "bias": (out_channels,) if bias else None}, {})


def _layer_norm_state(features: int):
    return ({"normalized_shape": (features,), "eps": 1e-5, "elementwise_affine": True},
            {"weight": (features,), "bias": (features,)}, {})


def _rms_norm_state(features: int):
    return ({"normalized_shape": (features,), "eps": None, "elementwise_affine": True},
            {"weight": (features,)}, {})


def _batch_norm_state(features: int):
    return ({"num_features": features, "eps": 1e-5, "momentum": 0.1, "affine": True,
             "track_running_stats": True},
            {"weight": (features,), "bias": (features,)},
            {"running_mean": (features,), "running_var": (features,), "num_batches_tracked": ()})


_LAYER_STATES: dict[type[nn.Module], Callable[..., tuple | None]] = {
    nn.Linear: _linear_state, nn.Conv2d: _conv2d_state, nn.LayerNorm: _layer_norm_state,
    nn.RMSNorm: _rms_norm_state, nn.BatchNorm2d: _batch_norm_state,
}
_making_unfilled: ContextVar[bool] = ContextVar("making_unfilled", default=False)
_states_hold: dict[type[nn.Module], bool] = {}  # per class: its `_LAYER_STATES` entry checked


def _unfilled(cls: type[nn.Module], args: tuple, kwargs: dict) -> nn.Module | None:
    """`_empty(cls, *args, **kwargs)` written from `_LAYER_STATES`, with an `Unfilled` in place of
    each tensor; None where the class has no entry, its entry does not hold in this torch (checked
    on the class's first use against `_meta`) or its constructor would refuse the arguments."""
    describe = _LAYER_STATES.get(cls)
    state = describe(*args, **kwargs) if describe is not None else None
    if state is None:
        return None
    module = _from_state(cls, *state)
    holds = _states_hold.get(cls)
    if holds is None:
        holds = _states_hold[cls] = _same_layer(module, _meta(cls, *args, **kwargs))
        if not holds:
            log.warning("torch's %s constructor differs from the builder's description of it: "
                        "the loader builds it with the constructor", cls.__name__)
    return module if holds else None


def _from_state(cls: type[nn.Module], attributes: dict, parameters: dict,
                buffers: dict) -> nn.Module:
    state = _MODULE_STATE.copy()
    for name in _MODULE_CONTAINERS:
        state[name] = state[name].copy()
    state["_parameters"].update((name, None if shape is None else Unfilled(shape, True))
                                for name, shape in parameters.items())
    state["_buffers"].update((name, None if shape is None else Unfilled(shape, False))
                             for name, shape in buffers.items())
    state.update(attributes)
    module = object.__new__(cls)
    object.__setattr__(module, "__dict__", state)
    return module


def _same_layer(unfilled: nn.Module, meta: nn.Module) -> bool:
    """The same attributes in the same order with equal values, the same parameters and buffers
    (names in order, shape, requires_grad), `Unfilled` where the meta layer holds a tensor."""
    state, expected = vars(unfilled), vars(meta)
    if list(state) != list(expected):
        return False
    for name, value in expected.items():
        got = state[name]
        if name in ("_parameters", "_buffers"):
            if list(got) != list(value) or not all(
                    (t is None and ref is None) or (
                        isinstance(t, Unfilled) and isinstance(ref, torch.Tensor)
                        and t.shape == tuple(ref.shape) and t.requires_grad == ref.requires_grad)
                    for t, ref in zip(got.values(), value.values(), strict=True)):
                return False
        elif type(got) is not type(value) or got != value:
            return False
    return True


class Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Mul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class Scale(nn.Module):
    """A learned per-channel gain (LayerScale); channels are the last dim of features, dim 1 of maps."""

    def __init__(self, channels: int, init: float, feature_maps: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, device="meta"))
        self.init = init
        self.feature_maps = feature_maps

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init)

    def zero_(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(-1, 1, 1) if self.feature_maps else self.weight  # (C, 1, 1) on maps
        return x * weight


class LowRank(nn.Module):
    """x -> B (A x) + b: A is rank-by-in without bias, B out-by-rank."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.down = _empty(nn.Linear, in_features, rank, bias=False)
        self.up = _empty(nn.Linear, rank, out_features, bias=bias)

    def zero_(self) -> None:
        # Only B: A stays random so that B's gradient (g outer A x) is nonzero from the start.
        _zero(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class AttentionHead(nn.Module):
    """Single-head self-attention over dim -2 of a (..., T, C) input."""

    def __init__(self, in_features: int, dim: int, causal: bool) -> None:
        super().__init__()
        self.qkv = _empty(nn.Linear, in_features, 3 * dim)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:  # the rank is static under tracing: no graph break
            raise ValueError(f"attention_head needs a sequence input (..., T, C), got shape "
                             f"{tuple(x.shape)}")
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (..., T, dim)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def _conv(taps: int, depthwise: bool = False) -> Callable[[Resolved, bool], nn.Module]:
    def make(node: Resolved, feature_maps: bool) -> nn.Module:
        attrs = node.attrs
        out = node.in_channels if depthwise else attrs["out"]
        return _empty(nn.Conv2d, node.in_channels, out, taps, stride=attrs["stride"],
                      padding=taps // 2, groups=node.in_channels if depthwise else 1,
                      bias=attrs["bias"])
    return make


# The only way an op becomes code. Every whitelisted op but input and output has an entry. Each
# makes its layer empty, on the meta device.
FACTORIES: dict[str, Callable[[Resolved, bool], nn.Module]] = {
    "linear": lambda n, _: _empty(nn.Linear, n.in_channels, n.attrs["out"], bias=n.attrs["bias"]),
    "low_rank": lambda n, _: _construct(LowRank, n.in_channels, n.attrs["rank"], n.attrs["out"],
                                        n.attrs["bias"]),
    "conv1x1": _conv(1),
    "conv3x3": _conv(3),
    "depthwise_conv3x3": _conv(3, depthwise=True),
    "layer_norm": lambda n, _: _empty(nn.LayerNorm, n.in_channels),
    "rms_norm": lambda n, _: _empty(nn.RMSNorm, n.in_channels),
    "batch_norm": lambda n, _: _empty(nn.BatchNorm2d, n.in_channels),
    "relu": lambda n, _: _construct(nn.ReLU),
    "gelu": lambda n, _: _construct(nn.GELU),
    "silu": lambda n, _: _construct(nn.SiLU),
    "tanh": lambda n, _: _construct(nn.Tanh),
    "sigmoid": lambda n, _: _construct(nn.Sigmoid),
    "mul": lambda n, _: _construct(Mul),
    "add": lambda n, _: _construct(Add),
    "attention_head": lambda n, _: _construct(AttentionHead, n.in_channels, n.attrs["dim"],
                                              n.attrs["causal"]),
    "dropout": lambda n, _: _construct(nn.Dropout, n.attrs["p"]),
    "scale": lambda n, maps: _construct(Scale, n.in_channels, float(n.attrs["init"]), maps),
}


class BlueprintModule(nn.Module):
    """A blueprint built for one interface. `layers[k]` is the node `node_ids[k]`. Constructed
    empty, on the meta device (`build` and `build_empty` make one)."""

    def __init__(self, ir: BlueprintIR, interface: KernelInterface, nodes: dict[str, Resolved],
                 blueprint_id: str, zero_init_node: str) -> None:
        super().__init__()
        feature_maps = interface.kind is LayerKind.CONV2D
        # Slot 0 holds the input; layer k writes slot k + 1 (nodes are in topological order).
        steps = [(node_id, node) for node_id, node in nodes.items()
                 if node.op not in ("input", "output")]
        input_id = next(node_id for node_id, node in nodes.items() if node.op == "input")
        slot = {input_id: 0} | {node_id: k + 1 for k, (node_id, _) in enumerate(steps)}
        output = next(node for node in nodes.values() if node.op == "output")
        # Plain attributes and the layer list written directly: nn.Module's __setattr__ and
        # ModuleList's add_module check every value's type, a third of an empty build's time.
        vars(self).update(
            interface=interface, blueprint_id=blueprint_id, name=ir.name,
            needs_sequence=ir.needs_sequence, node_ids=tuple(node_id for node_id, _ in steps),
            zero_init_node=zero_init_node,
            _reads=tuple(tuple(slot[ref] for ref in node.inputs) for _, node in steps),
            _output_slot=slot[output.inputs[0]])
        layers = _construct(nn.ModuleList)
        layers._modules.update((str(k), FACTORIES[node.op](node, feature_maps))
                               for k, (_, node) in enumerate(steps))
        self._modules["layers"] = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for layer, reads in zip(self.layers, self._reads):
            values.append(layer(*[values[i] for i in reads]))
        return values[self._output_slot]

    def extra_repr(self) -> str:
        return f"name={self.name}, interface={self.interface}, id={self.blueprint_id[:12]}"


def build(ir: BlueprintIR, interface: KernelInterface, *, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None, seed: int | None = None,
          generator: torch.Generator | None = None,
          budget: Budget = DEFAULT_BUDGET) -> BlueprintModule:
    """Validate `ir` at `interface` and build it, its output exactly zero for any input.

    Weights are drawn on the CPU from `generator`, or from a generator seeded with `seed`, or
    (neither given) from one seeded by the global RNG, as PyTorch's own layers would; the same
    seed gives the same weights on every device.
    """
    if seed is not None and generator is not None:
        raise ValueError("give a seed or a generator, not both")
    module = build_empty(ir, interface, ir_blueprint_id(ir), budget)
    if generator is None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator().manual_seed(seed)
    # Built on the meta device, so layer constructors draw nothing from the global RNG.
    module.to_empty(device="cpu")
    for layer in module.layers:
        _reset(layer, generator)
    _zero(module.layers[module.node_ids.index(module.zero_init_node)])
    return module.to(device=device, dtype=dtype)


def build_empty(ir: BlueprintIR, interface: KernelInterface, blueprint_id: str,
                budget: Budget = DEFAULT_BUDGET, *, unfilled: bool = False) -> BlueprintModule:
    """Check `ir` at `interface` (BlueprintValidationError as `validate`) and make its module with
    every parameter and buffer on the meta device: shapes, no values, nothing drawn. For a caller
    that assigns every tensor itself (the verifying loader, with the signed weights);
    `blueprint_id` is the IR's id as the caller has it (the loader read the IR by that hash).

    With `unfilled`, torch's layers hold an `Unfilled` placeholder where their meta tensors would
    be, and are made without their constructors (`_unfilled`): the module cannot run, or move,
    until its owner has assigned a tensor to every placeholder."""
    structure, nodes = check(ir, interface, budget)
    token = _making_unfilled.set(unfilled)
    try:
        return _construct(BlueprintModule, ir, interface, nodes, blueprint_id,
                          structure.zero_init_node)
    finally:
        _making_unfilled.reset(token)


def _reset(layer: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation, drawn from `generator`."""
    for sub in layer.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5), generator=generator)
            if sub.bias is not None:
                bound = 1 / math.sqrt(sub.weight[0].numel())  # 1/sqrt(fan_in)
                nn.init.uniform_(sub.bias, -bound, bound, generator=generator)
        elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm2d, Scale)):
            sub.reset_parameters()  # constants (and running statistics): no randomness


def _zero(layer: nn.Module) -> None:
    if isinstance(layer, (LowRank, Scale)):
        layer.zero_()
        return
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
