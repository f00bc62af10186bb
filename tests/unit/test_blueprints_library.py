"""The standard library: every blueprint validates, builds at awkward interfaces, starts at exactly
zero, and learns in every parameter once its last layer has moved."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources

import pytest
import torch

from esper.blueprints import OPS, blueprint_id, build, standard_library, validate
from esper.blueprints.builder import FACTORIES
from esper.contracts.assets import KernelInterface
from esper.contracts.enums import LayerKind

LIBRARY = standard_library()
# Widths that are not powers of two, a 1-wide host, an expansion; for conv hosts every stride
# from 1 to 3 on odd-sized maps.
INTERFACES = {
    LayerKind.LINEAR: ["linear:37:11", "linear:64:16", "linear:1:3", "linear:5:40"],
    LayerKind.CONV2D: ["conv2d:6:10:2", "conv2d:16:8:1", "conv2d:3:5:3", "conv2d:1:2:1"],
}
CASES = [(ir, text) for ir in LIBRARY for text in INTERFACES[ir.interface_kind]]


def _ids(case):
    return f"{case[0].name}@{case[1]}"


def sample_input(ir, interface: KernelInterface, batch: int = 2) -> torch.Tensor:
    """A fresh random input: (batch, T, in) for linear hosts, (batch, in, 9, 9) for conv hosts."""
    if interface.kind is LayerKind.CONV2D:
        return torch.randn(batch, interface.in_features, 9, 9)
    return torch.randn(batch, 3, interface.in_features)


def expected_shape(interface: KernelInterface, x: torch.Tensor) -> tuple[int, ...]:
    if interface.kind is LayerKind.CONV2D:
        s = interface.stride
        return (x.shape[0], interface.out_features, -(-x.shape[2] // s), -(-x.shape[3] // s))
    return (*x.shape[:-1], interface.out_features)


def test_library_has_15_to_20_uniquely_named_blueprints_of_both_kinds():
    names = [ir.name for ir in LIBRARY]
    assert 15 <= len(names) <= 20
    assert len(set(names)) == len(names)
    assert len({blueprint_id(ir) for ir in LIBRARY}) == len(LIBRARY)
    assert {ir.interface_kind for ir in LIBRARY} == set(LayerKind)
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name) for name in names)


def test_each_file_is_named_after_its_blueprint():
    folder = resources.files("esper.blueprints") / "library"
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".json"))
    assert files == sorted(f"{ir.name}.json" for ir in LIBRARY)


@pytest.mark.parametrize("ir", LIBRARY, ids=lambda ir: ir.name)
def test_every_library_blueprint_validates_at_its_probe_interfaces(ir):
    result = validate(ir)
    assert result.blueprint_id == blueprint_id(ir)
    assert len(result.checks) == 3
    assert result.param_count > 0 and result.flops_per_position > 0
    assert ir.description


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_builds_with_the_interface_shape_and_exactly_zero_output(case):
    ir, text = case
    interface = KernelInterface.parse(text)
    module = build(ir, interface, seed=0)
    x = sample_input(ir, interface)
    y = module(x)
    assert tuple(y.shape) == expected_shape(interface, x)
    assert torch.equal(y, torch.zeros_like(y))
    assert module.interface == interface and module.blueprint_id == blueprint_id(ir)
    assert sum(p.numel() for p in module.parameters()) == validate(ir, interface).param_count


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in ("linear:37:11", "conv2d:6:10:2")],
                         ids=_ids)
def test_every_parameter_learns_after_one_step(case):
    ir, text = case
    interface = KernelInterface.parse(text)
    module = build(ir, interface, seed=1)
    zeroed = {f"layers.{module.node_ids.index(module.zero_init_node)}."}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = sample_input(ir, interface, batch=4)
    target = torch.randn(expected_shape(interface, x))

    # Step 0: only the op feeding the output (which starts at zero) gets gradient.
    torch.nn.functional.mse_loss(module(x), target).backward()
    for name, p in module.named_parameters():
        starts_at_zero = any(name.startswith(prefix) for prefix in zeroed)
        if starts_at_zero and not name.endswith("down.weight"):
            assert p.grad.abs().sum() > 0, name
        else:
            assert torch.equal(p.grad, torch.zeros_like(p.grad)), name
    optimizer.step()
    optimizer.zero_grad()

    # Step 1: the last op has moved, so gradient reaches every parameter.
    torch.nn.functional.mse_loss(module(x), target).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_same_seed_same_weights_and_global_rng_untouched():
    ir = next(ir for ir in LIBRARY if ir.name == "inverted_bottleneck_silu_x2")
    interface = KernelInterface.parse("conv2d:6:10:2")
    before = torch.random.get_rng_state()
    a, b = build(ir, interface, seed=7), build(ir, interface, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    other = build(ir, interface, seed=8).state_dict()
    assert not torch.equal(other["layers.0.weight"], state_a["layers.0.weight"])


def test_without_a_seed_the_global_rng_decides():
    ir = next(ir for ir in LIBRARY if ir.name == "mlp_relu_w16")
    interface = KernelInterface.parse("linear:37:11")
    torch.manual_seed(3)
    a = build(ir, interface)
    torch.manual_seed(3)
    b = build(ir, interface)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)


def test_dtype_and_explicit_generator():
    ir = next(ir for ir in LIBRARY if ir.name == "swiglu_w32")
    interface = KernelInterface.parse("linear:37:11")
    module = build(ir, interface, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert all(p.dtype == torch.float64 for p in module.parameters())
    same = build(ir, interface, seed=5)
    assert torch.equal(module.layers[0].weight, same.layers[0].weight.double())
    with pytest.raises(ValueError, match="not both"):
        build(ir, interface, seed=1, generator=torch.Generator())


def test_attention_head_refuses_an_input_without_a_sequence_dimension():
    ir = next(ir for ir in LIBRARY if ir.name == "attention_head_d16")
    assert ir.needs_sequence and validate(ir).needs_sequence
    module = build(ir, KernelInterface.parse("linear:37:11"), seed=0)
    with pytest.raises(ValueError, match="sequence input"):
        module(torch.randn(4, 37))


@pytest.mark.parametrize("name, text", [("attention_head_d16", "linear:37:11"),
                                        ("bottleneck_bn_relu_w8", "conv2d:6:10:2"),
                                        ("sigmoid_gated_linear", "linear:37:11")])
def test_compiles_as_one_graph(name, text):
    ir = next(ir for ir in LIBRARY if ir.name == name)
    interface = KernelInterface.parse(text)
    module = build(ir, interface, seed=0)
    x = sample_input(ir, interface)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), module(x))


def test_the_builder_has_a_factory_for_every_whitelisted_op():
    assert set(FACTORIES) == set(OPS) - {"input", "output"}


def test_parsing_and_validating_do_not_import_torch():
    code = ("import sys, esper.blueprints as b; [b.validate(ir) for ir in b.standard_library()]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
