"""Karn will mutate IRs blindly: whatever a mutation does, the static check either refuses it with a
named rule, or the builder makes a module that fits the interface and starts at exactly zero.
Anything else (a KeyError, a torch shape error) is a hole in the check."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from esper.blueprints import (
    OPS,
    RULES,
    BlueprintValidationError,
    build,
    load_ir,
    standard_library,
    validate,
)
from esper.contracts.assets import KernelInterface
from esper.contracts.enums import LayerKind

LIBRARY = [ir.model_dump(mode="json") for ir in standard_library()]
BUILD_AT = {"linear": KernelInterface.parse("linear:37:11"),
            "conv2d": KernelInterface.parse("conv2d:6:10:2")}
OP_NAMES = sorted(OPS) + ["softmax", "eval", "conv5x5"]
ATTR_KEYS = ["out", "rank", "dim", "stride", "bias", "p", "init", "causal", "kernel"]
GOOD_WIDTHS = st.one_of(st.integers(1, 70), st.sampled_from(["in", "out"]),
                        st.builds(lambda m, f: {"mult_of": m, "factor": f},
                                  st.sampled_from(["in", "out"]),
                                  st.sampled_from([0.25, 0.5, 1, 1.5, 2, 3])))
WIDTHS = st.one_of(GOOD_WIDTHS, st.integers(-2, 0), st.sampled_from(["interface", "hidden"]))
GOOD_VALUES = {"width": GOOD_WIDTHS, "stride": st.sampled_from([1, 2, "interface"]),
               "bool": st.booleans(), "probability": st.sampled_from([0.0, 0.1, 0.5]),
               "number": st.sampled_from([0.0, 0.1, 1.0, -2.0])}
VALUES = st.one_of(WIDTHS, st.booleans(), st.sampled_from([0.0, 0.1, 0.99, 1.0, -1.0, 1e3, 2.5]))


def _new_id(nodes: list[dict]) -> str:
    taken = {node["id"] for node in nodes}
    return next(f"n{i}" for i in range(len(taken) + 1) if f"n{i}" not in taken)


def _good_attrs(op: str, draw) -> dict:
    return {key: draw(GOOD_VALUES[spec.kind.value]) for key, spec in OPS[op].attrs.items()
            if spec.required or draw(st.booleans())}


def _mutate(data: dict, draw) -> None:
    """One random mutation of the kinds Karn's operators make, applied in place.

    Most are plausible (an op of the same arity that fits the blueprint's kind, attributes the op
    takes, a new node spliced into the graph) so that many children build; a fifth are wild
    (any op, any attribute, any node including the input and output).
    """
    nodes = data["nodes"]
    wild = draw(st.integers(0, 4)) == 4  # Hypothesis leans to 0: keep plausible the simple case
    pickable = nodes if wild else [n for n in nodes if n["op"] not in ("input", "output")]
    node = draw(st.sampled_from(pickable or nodes))
    ids = [n["id"] for n in nodes]
    sources = [n["id"] for n in nodes if n["op"] != "output"] or ["ghost"]
    if wild:
        sources = ids + ["ghost"]
    fitting = [name for name, spec in OPS.items() if name not in ("input", "output")
               and LayerKind(data["interface_kind"]) in spec.consumes]
    kind = draw(st.sampled_from(["op", "width", "drop", "rewire", "add", "attrs", "kind"]))
    if kind == "op":
        same_arity = [name for name in fitting if OPS[name].arity == len(node.get("inputs", []))]
        node["op"] = draw(st.sampled_from(OP_NAMES if wild or not same_arity else same_arity))
        if not wild and node["op"] in OPS:
            node["attrs"] = _good_attrs(node["op"], draw)
    elif kind == "width":
        spec = OPS.get(node["op"])
        takes = [key for key, a in spec.attrs.items() if a.kind.value == "width"] if spec else []
        key = draw(st.sampled_from(["out", "rank", "dim"] if wild or not takes else takes))
        node.setdefault("attrs", {})[key] = draw(WIDTHS if wild else GOOD_WIDTHS)
    elif kind == "drop" and len(nodes) > 1:
        nodes.remove(node)
        if not wild and node.get("inputs"):  # splice it out rather than leave a hole
            for other in nodes:
                other["inputs"] = [node["inputs"][0] if ref == node["id"] else ref
                                   for ref in other.get("inputs", [])]
    elif kind == "rewire" and node.get("inputs"):
        position = draw(st.integers(0, len(node["inputs"]) - 1))
        node["inputs"][position] = draw(st.sampled_from(sources))
    elif kind == "add":
        op = draw(st.sampled_from(OP_NAMES if wild else fitting))
        arity = OPS[op].arity if op in OPS else 1
        new = {"id": _new_id(nodes), "op": op,
               "inputs": [draw(st.sampled_from(sources)) for _ in range(arity)]}
        if op in OPS and not wild:
            new["attrs"] = _good_attrs(op, draw)
        elif draw(st.booleans()):
            new["attrs"] = {draw(st.sampled_from(ATTR_KEYS)): draw(VALUES)}
        nodes.insert(draw(st.integers(0, len(nodes))), new)
        consumers = [other for other in nodes if other.get("inputs") and other is not new]
        if consumers and (not wild or draw(st.booleans())):  # splice it in so it is not dead
            consumer = draw(st.sampled_from(consumers))
            consumer["inputs"][draw(st.integers(0, len(consumer["inputs"]) - 1))] = new["id"]
    elif kind == "attrs":
        if wild or node["op"] not in OPS or not OPS[node["op"]].attrs:
            node.setdefault("attrs", {})[draw(st.sampled_from(ATTR_KEYS))] = draw(VALUES)
        else:
            node["attrs"] = _good_attrs(node["op"], draw)
    elif kind == "kind" and wild:
        data["interface_kind"] = "conv2d" if data["interface_kind"] == "linear" else "linear"


def _input(interface: KernelInterface) -> torch.Tensor:
    if interface.kind is LayerKind.CONV2D:
        return torch.randn(2, interface.in_features, 9, 9)
    return torch.randn(2, 3, interface.in_features)  # a sequence, so attention heads can run


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_library_irs_are_refused_by_name_or_build_a_zero_module(data):
    parent = data.draw(st.sampled_from(LIBRARY), label="parent")
    child = json.loads(json.dumps(parent))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        _mutate(child, data.draw)
    interface = BUILD_AT[child["interface_kind"]]
    try:
        ir = load_ir(json.dumps(child), source="child.json")
        validate(ir)
        module = build(ir, interface, seed=0)
    except BlueprintValidationError as e:
        assert e.rule in RULES
        event(f"refused: {e.rule}")  # pytest --hypothesis-show-statistics shows the mix
        message = str(e)
        assert message and "\n" not in message and f"rule '{e.rule}'" in message
        return
    event("built")
    x = _input(interface)
    y = module(x)
    s = interface.stride
    wanted = ((2, 3, 11) if interface.kind is LayerKind.LINEAR
              else (2, interface.out_features, -(-9 // s), -(-9 // s)))
    assert tuple(y.shape) == wanted
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()  # the graph is differentiable end to end


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_builders_check_agrees_with_validate_on_mutated_irs(data):
    """`check` (the builder's, resolving nodes as tuples) and `validate` (contracts) refuse the
    same IRs with the same message, and resolve the rest to the same nodes."""
    from esper.blueprints import check

    parent = data.draw(st.sampled_from(LIBRARY), label="parent")
    child = json.loads(json.dumps(parent))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        _mutate(child, data.draw)
    try:
        ir = load_ir(json.dumps(child), source="child.json")
    except BlueprintValidationError:
        return
    for interface in BUILD_AT.values():
        outcomes = []
        for run in (lambda face: check(ir, face)[1], lambda face: validate(ir, face).checks[0]):
            try:
                outcomes.append(run(interface))
            except BlueprintValidationError as e:
                outcomes.append(str(e))
        resolved, contract = outcomes
        if isinstance(contract, str):
            assert resolved == contract
            continue
        assert list(resolved) == list(contract.nodes)
        for node_id, node in contract.nodes.items():
            got = resolved[node_id]
            assert (got.op, list(got.inputs), got.attrs, got.in_channels, got.params,
                    got.flops_per_position) == (node.op, node.inputs, node.attrs,
                                                node.in_channels, node.params,
                                                node.flops_per_position)
            assert tuple(got.shape) == (node.shape.kind, node.shape.channels, node.shape.stride)
            assert str(got.shape) == str(node.shape)
        assert sum(n.params for n in resolved.values()) == contract.param_count
