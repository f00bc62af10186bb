"""Shape inference and cost counting for one concrete interface (pure Python, no torch).

A tensor's shape is its kind, its channel width and, for feature maps, its stride: the
cumulative spatial downsampling. Every conv is 'same'-padded (3x3 with padding 1, 1x1 with none),
so a stride-s conv maps H to ceil(H/s), and since ceil(ceil(H/a)/b) = ceil(H/(ab)), a chain of
strides is exactly their product. A conv host with interface stride s therefore needs a
blueprint whose output has stride s.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from esper.blueprints.attrs import resolve_attrs
from esper.blueprints.budget import Budget
from esper.blueprints.graph import Structure
from esper.blueprints.ir import BlueprintIR, Node
from esper.blueprints.ops import ACTIVATIONS
from esper.blueprints.rules import BlueprintValidationError
from esper.contracts.assets import KernelInterface
from esper.contracts.base import Contract
from esper.contracts.enums import LayerKind

_NORM_FLOPS = 5  # per element: mean, variance, normalise, scale, shift (a rough count)


def _describe(kind: LayerKind, channels: int, stride: int) -> str:
    if kind is LayerKind.LINEAR:
        return f"(..., {channels})"
    if stride == 1:
        return f"(B, {channels}, H, W)"
    return f"(B, {channels}, H/{stride}, W/{stride})"


class TensorShape(Contract):
    kind: LayerKind
    channels: int
    stride: int = 1  # feature maps only: the map is ceil(H/stride) x ceil(W/stride)

    def __str__(self) -> str:
        return _describe(self.kind, self.channels, self.stride)


class ResolvedNode(Contract):
    """One node with everything the builder needs: concrete attributes and widths."""

    op: str
    inputs: list[str]
    attrs: dict[str, bool | int | float]
    in_channels: int  # the width of its first input; 0 for the input node
    shape: TensorShape  # of its result
    params: int
    flops_per_position: float


class InterfaceCheck(Contract):
    """A blueprint checked for one interface: every node's shape and the totals."""

    interface: KernelInterface
    nodes: dict[str, ResolvedNode]  # in topological order
    param_count: int
    flops_per_position: int


class Shape(NamedTuple):
    """A TensorShape as the inference computes it (a tuple: the contract's validation, per node,
    was a third of a check; `infer` gives contracts, `resolve` these)."""

    kind: LayerKind
    channels: int
    stride: int

    def __str__(self) -> str:
        return _describe(self.kind, self.channels, self.stride)

    def with_channels(self, channels: int) -> Shape:
        return Shape(self.kind, channels, self.stride)


class Resolved(NamedTuple):
    """A ResolvedNode as the inference computes it: what the builder reads."""

    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, bool | int | float]
    in_channels: int
    shape: Shape
    params: int
    flops_per_position: float


def infer(ir: BlueprintIR, structure: Structure, interface: KernelInterface,
          budget: Budget) -> InterfaceCheck:
    """Rules `interface`, `shape`, `param_budget` and `flop_budget` at `interface`."""
    nodes, params, flops = resolve(ir, structure, interface, budget)
    return InterfaceCheck(
        interface=interface, param_count=params, flops_per_position=flops,
        nodes={node_id: ResolvedNode(
            op=node.op, inputs=list(node.inputs), attrs=node.attrs, in_channels=node.in_channels,
            shape=TensorShape(kind=node.shape.kind, channels=node.shape.channels,
                              stride=node.shape.stride),
            params=node.params, flops_per_position=node.flops_per_position)
            for node_id, node in nodes.items()})


def resolve(ir: BlueprintIR, structure: Structure, interface: KernelInterface,
            budget: Budget) -> tuple[dict[str, Resolved], int, int]:
    """`infer`'s rules, raised the same way, giving (every node resolved in topological order,
    the parameter count, the FLOPs per position) without the contracts: for the builder."""
    where = str(interface)
    if interface.kind is not ir.interface_kind:
        raise BlueprintValidationError(
            "interface", f"a {ir.interface_kind.value} blueprint cannot plug into a "
                         f"{interface.kind.value} host", interface=where)
    by_id = {node.id: node for node in ir.nodes}
    resolved: dict[str, Resolved] = {}
    for node_id in structure.order:
        node = by_id[node_id]
        inputs = [resolved[ref].shape for ref in node.inputs]
        attrs = resolve_attrs(node, interface)
        shape, params, flops = _infer_node(node, inputs, attrs, interface, budget)
        resolved[node_id] = Resolved(node.op, tuple(node.inputs), attrs,
                                     inputs[0].channels if inputs else 0, shape, params,
                                     flops / shape.stride**2)
    _check_output(resolved[structure.output_id].shape, structure.output_id, interface)
    params = sum(node.params for node in resolved.values())
    flops = math.ceil(sum(node.flops_per_position for node in resolved.values()))
    if params > budget.max_params:
        raise BlueprintValidationError(
            "param_budget", f"{params} parameters; the budget allows {budget.max_params}",
            interface=where)
    if flops > budget.max_flops_per_position:
        raise BlueprintValidationError(
            "flop_budget", f"{flops} FLOPs per input position; the budget allows "
                           f"{budget.max_flops_per_position}", interface=where)
    return resolved, params, flops


def _infer_node(node: Node, inputs: list[Shape], attrs: dict, interface: KernelInterface,
                budget: Budget) -> tuple[Shape, int, float]:
    """The node's result shape, its parameter count, and its FLOPs per position of its result."""
    op = node.op
    if op == "input":
        return Shape(interface.kind, interface.in_features, 1), 0, 0.0
    x = inputs[0]
    c = x.channels
    bias = int(attrs.get("bias", False))
    if op == "output":
        return x, 0, 0.0
    if op in ("add", "mul"):
        if inputs[0] != inputs[1]:
            raise BlueprintValidationError(
                "shape", f"{op} needs equal inputs, got {inputs[0]} and {inputs[1]}", node=node.id,
                interface=str(interface))
        return x, 0, float(c)
    if op == "linear":
        out = attrs["out"]
        return x.with_channels(out), c * out + out * bias, 2.0 * c * out
    if op == "low_rank":
        rank, out = attrs["rank"], attrs["out"]
        return (x.with_channels(out), c * rank + rank * out + out * bias,
                2.0 * rank * (c + out))
    if op in ("conv1x1", "conv3x3"):
        taps = 1 if op == "conv1x1" else 9
        out = attrs["out"]
        shape = Shape(x.kind, out, x.stride * attrs["stride"])
        return shape, taps * c * out + out * bias, 2.0 * taps * c * out
    if op == "depthwise_conv3x3":
        shape = Shape(x.kind, c, x.stride * attrs["stride"])
        return shape, 9 * c + c * bias, 18.0 * c
    if op == "attention_head":
        dim, seq = attrs["dim"], budget.reference_seq_len
        # Fused q, k, v projections with biases; then scores and the weighted sum over `seq`
        # tokens and a softmax, per token.
        flops = 2.0 * c * 3 * dim + 4.0 * seq * dim + 3.0 * seq
        return x.with_channels(dim), 3 * (c * dim + dim), flops
    if op in ("layer_norm", "batch_norm"):
        return x, 2 * c, float(_NORM_FLOPS * c)
    if op == "rms_norm":
        return x, c, float(_NORM_FLOPS * c)
    if op == "scale":
        return x, c, float(c)
    if op in ACTIVATIONS or op == "dropout":
        return x, 0, float(c)
    raise AssertionError(f"op {op!r} is whitelisted but has no shape rule")


def _check_output(shape: Shape, output_id: str, interface: KernelInterface) -> None:
    stride = interface.stride if interface.kind is LayerKind.CONV2D else 1
    wanted = Shape(interface.kind, interface.out_features, stride)
    if shape != wanted:
        raise BlueprintValidationError(
            "interface", f"the output is {shape}, the interface needs {wanted}", node=output_id,
            interface=str(interface))
