"""A blueprint's id: the sha256 of its canonical JSON (DESIGN.md section 7)."""

from __future__ import annotations

import hashlib
import json

from esper.blueprints.graph import topological_order
from esper.blueprints.ir import BlueprintIR


def canonical_json(ir: BlueprintIR) -> bytes:
    """The IR as UTF-8 JSON with sorted keys and no whitespace, schema defaults written out.

    Nodes are listed in topological order with ties broken by id, so two files that list the
    same graph's nodes differently are the same blueprint. A graph with no such order (a cycle,
    an unknown input) keeps its nodes as given. Op attribute defaults are not filled in:
    `"bias": true` written out and left out are two ids for one module.
    """
    data = ir.model_dump(mode="json")
    order = topological_order(ir.nodes)
    if order is not None:
        position = {node_id: i for i, node_id in enumerate(order)}
        data["nodes"].sort(key=lambda node: position[node["id"]])
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return text.encode("utf-8")


def blueprint_id(ir: BlueprintIR) -> str:
    return hashlib.sha256(canonical_json(ir)).hexdigest()
