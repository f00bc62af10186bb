"""The rules that hold for a blueprint whatever interface it is built for: a well-formed DAG of
whitelisted ops, from one input to one output, ending in an op that starts at zero."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from esper.blueprints.attrs import check_attrs
from esper.blueprints.budget import Budget
from esper.blueprints.ir import BlueprintIR, Node
from esper.blueprints.ops import OPS
from esper.blueprints.rules import BlueprintValidationError

_KIND_NAMES = {"linear": "features (..., C)", "conv2d": "feature maps (B, C, H, W)"}


@dataclass(frozen=True)
class Structure:
    order: tuple[str, ...]  # topological, ties broken by id
    input_id: str
    output_id: str
    zero_init_node: str  # the node feeding the output; the builder zeroes its last parameters
    depth: int  # ops on the longest input-to-output path


def topological_order(nodes: Sequence[Node]) -> list[str] | None:
    """The nodes in an order where every node comes after its inputs, ties broken by id, so the
    order depends on the graph only, not on how its nodes are listed. None when ids repeat, an
    input names no node, or there is a cycle."""
    ids = [node.id for node in nodes]
    if len(set(ids)) != len(ids) or any(ref not in ids for node in nodes for ref in node.inputs):
        return None
    order = _kahn(nodes)
    return order if len(order) == len(ids) else None


def _kahn(nodes: Sequence[Node]) -> list[str]:
    """Kahn's algorithm; it stops short of the nodes on or after a cycle."""
    pending = {node.id: len(node.inputs) for node in nodes}  # input edges not yet satisfied
    consumers: dict[str, list[str]] = {node.id: [] for node in nodes}
    for node in nodes:
        for ref in node.inputs:
            consumers[ref].append(node.id)
    ready = [node_id for node_id, count in pending.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node_id = heapq.heappop(ready)
        order.append(node_id)
        for consumer in consumers[node_id]:
            pending[consumer] -= 1
            if pending[consumer] == 0:
                heapq.heappush(ready, consumer)
    return order


def check_structure(ir: BlueprintIR, budget: Budget) -> Structure:
    """Every interface-independent rule, in the order of `RULES`; the first broken one raises."""
    nodes = ir.nodes
    ids = _check_ids_and_ops(nodes)
    input_id = _single(nodes, "input", "single_input")
    output_id = _single(nodes, "output", "single_output")
    for node in nodes:
        for ref in node.inputs:
            if ref not in ids:
                raise BlueprintValidationError("unknown_ref", f"input '{ref}' names no node",
                                               node=node.id)
    for node in nodes:
        if output_id in node.inputs:
            raise BlueprintValidationError(
                "terminal_output", f"reads the output node '{output_id}', which feeds nothing",
                node=node.id)
    for node in nodes:
        spec = OPS[node.op]
        if len(node.inputs) != spec.arity:
            raise BlueprintValidationError(
                "arity", f"{node.op} takes {spec.arity} input(s), got {len(node.inputs)}", node=node.id)
    for node in nodes:
        check_attrs(node)
    carried = ir.interface_kind.value
    for node in nodes:
        if ir.interface_kind not in OPS[node.op].consumes:
            wants = " or ".join(sorted(_KIND_NAMES[k.value] for k in OPS[node.op].consumes))
            raise BlueprintValidationError(
                "edge_type", f"{node.op} consumes {wants}, but a {carried} blueprint carries "
                             f"{_KIND_NAMES[carried]}", node=node.id)
    order = topological_order(nodes)
    if order is None:
        cycle = _find_cycle(nodes)
        raise BlueprintValidationError("acyclic", "the graph has a cycle: " + " -> ".join(cycle),
                                       node=cycle[0])
    _check_all_reach_output(nodes, order, output_id)
    by_id = {node.id: node for node in nodes}
    feeding = by_id[output_id].inputs[0]
    if not OPS[by_id[feeding].op].zero_init:
        zeroable = ", ".join(sorted(name for name, spec in OPS.items() if spec.zero_init))
        raise BlueprintValidationError(
            "zero_init", f"feeds the output but {by_id[feeding].op} cannot start at zero; the last "
                         f"op must be one of: {zeroable}", node=feeding)
    _check_no_redundant_bias(nodes)
    if len(nodes) > budget.max_nodes:
        raise BlueprintValidationError(
            "node_count", f"{len(nodes)} nodes; the budget allows {budget.max_nodes}")
    depth = _depth(by_id, order, output_id)
    if depth > budget.max_depth:
        raise BlueprintValidationError(
            "depth", f"the longest path has {depth} ops; the budget allows {budget.max_depth}")
    return Structure(tuple(order), input_id, output_id, feeding, depth)


def _check_ids_and_ops(nodes: Sequence[Node]) -> set[str]:
    seen: set[str] = set()
    for node in nodes:
        if node.id in seen:
            raise BlueprintValidationError("duplicate_id", "the id is used by two nodes", node=node.id)
        seen.add(node.id)
    for node in nodes:
        if node.op not in OPS:
            raise BlueprintValidationError("op_whitelist", f"unknown op '{node.op}'", node=node.id)
    return seen


def _single(nodes: Sequence[Node], op: str, rule: str) -> str:
    found = [node.id for node in nodes if node.op == op]
    if len(found) != 1:
        raise BlueprintValidationError(
            rule, f"a blueprint has exactly one {op} node, this one has {len(found)}",
            node=found[1] if len(found) > 1 else None)
    return found[0]


def _find_cycle(nodes: Sequence[Node]) -> list[str]:
    """A cycle among the nodes Kahn's algorithm could not order, as ids from first to first."""
    ordered = set(_kahn(nodes))
    inputs = {node.id: [ref for ref in node.inputs if ref not in ordered] for node in nodes}
    # Every unordered node has an unordered input, so walking inputs must come back on itself.
    walk = [next(node.id for node in nodes if node.id not in ordered)]
    while walk.count(walk[-1]) < 2:
        walk.append(inputs[walk[-1]][0])
    start = walk.index(walk[-1])
    return list(reversed(walk[start:]))


def _check_all_reach_output(nodes: Sequence[Node], order: list[str], output_id: str) -> None:
    by_id = {node.id: node for node in nodes}
    live = {output_id}
    for node_id in reversed(order):
        if node_id in live:
            live.update(by_id[node_id].inputs)
    for node in nodes:
        if node.id not in live:
            raise BlueprintValidationError(
                "dead_node", "its result never reaches the output (its parameters could not learn)",
                node=node.id)


def _check_no_redundant_bias(nodes: Sequence[Node]) -> None:
    ops = {node.id: node.op for node in nodes}
    consumers: dict[str, list[str]] = {node.id: [] for node in nodes}
    for node in nodes:
        for ref in node.inputs:
            consumers[ref].append(ops[node.id])
    for node in nodes:
        biased = OPS[node.op].has_bias and node.attrs.get("bias", True)
        if biased and consumers[node.id] and all(op == "batch_norm" for op in consumers[node.id]):
            raise BlueprintValidationError(
                "redundant_bias", f"{node.op} feeds only batch_norm, which removes a per-channel "
                                  "bias; set \"bias\": false", node=node.id)


def _depth(by_id: dict[str, Node], order: list[str], output_id: str) -> int:
    depth: dict[str, int] = {}
    for node_id in order:
        node = by_id[node_id]
        below = max((depth[ref] for ref in node.inputs), default=0)
        # The input and output nodes are not ops; they add nothing to the depth.
        depth[node_id] = below + (0 if node.op in ("input", "output") else 1)
    return depth[output_id]
