"""build_empty: the module `build` makes, with shapes and no values, and the loader's plan of it.

The verifying loader builds each blueprint with `build_empty` (on the meta device, no
initialiser run) and fills it with the signed weights; `build` starts from the same module and
draws its values from a generator. Both must give the very module the IR describes.
"""

from __future__ import annotations

import pytest
import torch

from esper.blueprints import (
    BlueprintValidationError,
    blueprint_id,
    build,
    build_empty,
    standard_library,
)
from esper.contracts import KernelInterface

INTERFACES = {"linear": ("linear:37:11", "linear:64:32"), "conv2d": ("conv2d:6:10:2", "conv2d:8:8:1")}
CASES = [(ir, face) for ir in standard_library() for face in INTERFACES[ir.interface_kind.value]]


def _name(case) -> str:
    return f"{case[0].name}@{case[1]}" if isinstance(case, tuple) else str(case)


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_the_empty_module_is_the_built_module_without_values(case):
    ir, face = case
    interface = KernelInterface.parse(face)
    rng = torch.get_rng_state()
    empty = build_empty(ir, interface, blueprint_id(ir))
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    built = build(ir, interface, seed=0)
    assert repr(empty) == repr(built)
    assert [(k, v.shape, v.dtype) for k, v in empty.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in built.state_dict().items()]
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    assert [p.requires_grad for p in empty.parameters()] == [p.requires_grad for p in built.parameters()]
    # The initialiser was skipped on the instance only: the class's method is intact.
    assert not any("reset_parameters" in vars(m) for m in empty.modules())


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_the_loaders_plan_names_every_state_dict_entry(case):
    from pipelines.tezzeret.loader import _Skeleton

    ir, face = case
    module = build_empty(ir, KernelInterface.parse(face), blueprint_id(ir))
    skeleton = _Skeleton.of(module)
    state = module.state_dict(keep_vars=True)
    assert list(skeleton.slots) == list(state)
    unfilled = build_empty(ir, KernelInterface.parse(face), blueprint_id(ir), unfilled=True)
    assert _Skeleton.of(unfilled).slots == skeleton.slots
    modules = skeleton.fresh()
    for name, slot in skeleton.slots.items():
        assert slot.shape == tuple(state[name].shape)
        owner = modules[slot.owner]
        assert (slot.attr in owner._parameters) is slot.parameter
        assert (slot.attr in owner._buffers) is not slot.parameter


def _assert_unfilled_is_meta(unfilled: torch.nn.Module, meta: torch.nn.Module) -> None:
    """The same module tree, attributes (in order, equal values) and state-dict slots, with an
    `Unfilled` of the meta tensor's shape and requires_grad in each layer that `_LAYER_STATES`
    describes (and the meta tensor itself in any other module)."""
    from esper.blueprints.builder import _LAYER_STATES, Unfilled

    assert type(unfilled) is type(meta)
    state, expected = vars(unfilled), vars(meta)
    assert list(state) == list(expected)
    described = type(meta) in _LAYER_STATES
    for name, value in expected.items():
        got = state[name]
        if name == "_modules":
            assert list(got) == list(value)
            for child, ref in zip(got.values(), value.values(), strict=True):
                _assert_unfilled_is_meta(child, ref)
        elif name in ("_parameters", "_buffers"):
            assert list(got) == list(value)
            for t, ref in zip(got.values(), value.values(), strict=True):
                if ref is None:
                    assert t is None
                    continue
                assert isinstance(t, Unfilled) if described else t.is_meta
                assert (tuple(t.shape), t.requires_grad) == (tuple(ref.shape), ref.requires_grad)
        else:
            assert type(got) is type(value) and got == value, name


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_an_unfilled_module_is_the_empty_module_with_placeholders(case):
    """`unfilled=True` writes torch's layers from the builder's description of their
    constructors: the very attributes and slots the constructors give, no tensor made."""
    from esper.blueprints.builder import _states_hold

    ir, face = case
    interface = KernelInterface.parse(face)
    unfilled = build_empty(ir, interface, blueprint_id(ir), unfilled=True)
    _assert_unfilled_is_meta(unfilled, build_empty(ir, interface, blueprint_id(ir)))
    assert all(_states_hold.values())  # this torch's constructors are as described
    again = build_empty(ir, interface, blueprint_id(ir), unfilled=True)
    for a, b in zip(unfilled.modules(), again.modules(), strict=True):  # no container shared
        assert not any(value is vars(b)[name] for name, value in vars(a).items()
                       if isinstance(value, (dict, set)))


def test_a_layer_whose_constructor_differs_from_its_description_is_constructed(monkeypatch):
    """A torch whose constructor gives a layer something the description does not: that class
    is made by its constructor (on the meta device), checked once per process."""
    from esper.blueprints import builder

    def linear_with_an_extra(in_features, out_features, bias=True):
        attributes, parameters, buffers = builder._linear_state(in_features, out_features, bias)
        return {**attributes, "extra": 1}, parameters, buffers

    monkeypatch.setitem(builder._LAYER_STATES, torch.nn.Linear, linear_with_an_extra)
    monkeypatch.setattr(builder, "_states_hold", {})
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    interface = KernelInterface.parse("linear:37:11")
    for _ in range(2):
        module = build_empty(ir, interface, blueprint_id(ir), unfilled=True)
        assert all(p.is_meta for p in module.parameters())
        assert not any("extra" in vars(m) for m in module.modules())
    assert builder._states_hold == {torch.nn.Linear: False}


def test_build_empty_checks_the_blueprint_at_the_interface():
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    with pytest.raises(BlueprintValidationError, match="rule 'interface'"):
        build_empty(ir, KernelInterface.parse("conv2d:6:10:1"), blueprint_id(ir))


def test_build_draws_the_same_weights_as_torchs_own_layers():
    """`build` resets layers it made without their initialisers: for a seed, the values are
    those PyTorch's default initialisation draws from that generator."""
    import math

    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    module = build(ir, KernelInterface.parse("linear:37:11"), seed=5)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.nn.Linear(37, 8)
    torch.nn.init.kaiming_uniform_(hidden.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(37)
    torch.nn.init.uniform_(hidden.bias, -bound, bound, generator=generator)
    assert torch.equal(module.layers[0].weight, hidden.weight)
    assert torch.equal(module.layers[0].bias, hidden.bias)
    assert not module.layers[-1].weight.any()  # the op feeding the output starts at zero


# `_construct`: every module the builder makes skips nn.Module's generic bookkeeping. It must make
# the very module that the class's own constructor makes.

def _reference_paths(monkeypatch) -> None:
    """Make the builder construct every module the ordinary way: `cls(...)`, nn.Module.__init__
    and nn.Module.__setattr__ throughout."""
    from esper.blueprints import builder

    def empty(cls, *args, **kwargs):
        module = cls.__new__(cls)
        object.__setattr__(module, "reset_parameters", builder._no_values)
        cls.__init__(module, *args, device="meta", **kwargs)
        del module.__dict__["reset_parameters"]
        return module

    monkeypatch.setattr(builder, "_construct", lambda cls, *args, **kwargs: cls(*args, **kwargs))
    monkeypatch.setattr(builder, "_empty", empty)


def _assert_same_module(fast: torch.nn.Module, reference: torch.nn.Module) -> None:
    """The same class, the same attributes in the same order with equal values, the same
    containers (type and keys), the same tensors (kind, shape, dtype, device, requires_grad),
    recursively."""
    assert type(fast) is type(reference)
    state, expected = vars(fast), vars(reference)
    assert list(state) == list(expected)
    for name, value in expected.items():
        got = state[name]
        assert type(got) is type(value), name
        if name == "_modules":
            assert list(got) == list(value)
            for child, ref in zip(got.values(), value.values(), strict=True):
                _assert_same_module(child, ref)
        elif name in ("_parameters", "_buffers"):
            assert list(got) == list(value)
            for t, ref in zip(got.values(), value.values(), strict=True):
                assert type(t) is type(ref)
                if ref is not None:
                    assert (t.shape, t.dtype, t.device, t.requires_grad) == \
                        (ref.shape, ref.dtype, ref.device, ref.requires_grad)
        elif isinstance(value, torch.Tensor):
            assert (got.shape, got.dtype, got.device) == (value.shape, value.dtype, value.device)
        else:
            assert got == value, name


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_construct_makes_the_module_the_constructors_make(case, monkeypatch):
    ir, face = case
    interface = KernelInterface.parse(face)
    fast = build_empty(ir, interface, blueprint_id(ir))
    again = build_empty(ir, interface, blueprint_id(ir))
    for a, b in zip(fast.modules(), again.modules(), strict=True):  # no container shared
        assert not any(value is vars(b)[name] for name, value in vars(a).items()
                       if isinstance(value, (dict, set)))
    _reference_paths(monkeypatch)
    reference = build_empty(ir, interface, blueprint_id(ir))
    _assert_same_module(fast, reference)
    assert repr(fast) == repr(reference)


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_construct_builds_the_same_function(case, monkeypatch):
    """Built from one seed, both paths give bit-identical weights, outputs and gradients, in
    train and eval mode."""
    ir, face = case
    interface = KernelInterface.parse(face)
    fast = build(ir, interface, seed=3)
    _reference_paths(monkeypatch)
    reference = build(ir, interface, seed=3)
    _assert_same_module(fast, reference)
    state = reference.state_dict()
    assert list(fast.state_dict()) == list(state)
    assert all(torch.equal(t, state[name]) for name, t in fast.state_dict().items())
    with torch.no_grad():  # the zero-initialised last op would hide every other gradient
        for module in (fast, reference):
            last = module.layers[module.node_ids.index(module.zero_init_node)]
            for p in last.parameters():
                p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    if interface.kind.value == "linear":
        shape = (2, 5, interface.in_features) if ir.needs_sequence else (6, interface.in_features)
    else:
        shape = (2, interface.in_features, 7, 9)
    x = torch.randn(shape)
    for train in (True, False):
        results = []
        for module in (fast, reference):
            module.train(train)
            module.zero_grad()
            torch.manual_seed(11)  # dropout draws the same mask in both
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.square().sum().backward()
            results.append((y, xi.grad, [p.grad for p in module.parameters()]))
        (y, gx, grads), (y_ref, gx_ref, grads_ref) = results
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
        assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref, strict=True))


def test_construct_leaves_torchs_classes_and_global_hooks_alone():
    """The construction subclass never escapes, and global registration hooks still see every
    parameter and submodule (with a hook registered, nn.Module's own __setattr__ runs)."""
    from torch.nn.modules.module import (
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    ir = next(ir for ir in standard_library() if ir.name == "low_rank_r4")
    interface = KernelInterface.parse("linear:37:11")
    from esper.blueprints.builder import BlueprintModule, LowRank

    module = build_empty(ir, interface, blueprint_id(ir))
    assert [type(m) for m in module.modules()] == \
        [BlueprintModule, torch.nn.ModuleList, LowRank, torch.nn.Linear, torch.nn.Linear]
    seen: list[str] = []
    handles = [register_module_parameter_registration_hook(lambda m, name, p: seen.append(name)),
               register_module_module_registration_hook(lambda m, name, sub: seen.append(name))]
    try:
        build_empty(ir, interface, blueprint_id(ir))
    finally:
        for handle in handles:
            handle.remove()
    assert seen.count("weight") == 2 and "down" in seen and "up" in seen
