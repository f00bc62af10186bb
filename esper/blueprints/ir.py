"""BlueprintIR: a blueprint as data. A JSON graph of whitelisted ops; nothing in it is code.

```json
{"format": "esper.blueprint/1", "name": "mlp_relu_w16", "interface_kind": "linear",
 "description": "x -> 16 hidden ReLU units -> the seed's chunk",
 "nodes": [
   {"id": "x", "op": "input"},
   {"id": "hidden", "op": "linear", "inputs": ["x"], "attrs": {"out": 16}},
   {"id": "act", "op": "relu", "inputs": ["hidden"]},
   {"id": "proj", "op": "linear", "inputs": ["act"], "attrs": {"out": "out"}},
   {"id": "y", "op": "output", "inputs": ["proj"]}]}
```

A blueprint is interface-parametric: it is built for a concrete `KernelInterface`, and a width
attribute is an absolute int, `"in"` / `"out"` (the interface's in/out width), or
`{"mult_of": "in" | "out", "factor": F}` = ceil(F x that width), computed exactly from the
decimal F as written (0.1 x 30 is 3). Each node lists its `inputs` by id, in order (order
matters to no whitelisted op but is kept). The schema checks structure and value types only;
what the ops and attributes mean is checked by `validate`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, ValidationError

from esper.blueprints.ops import MAX_FACTOR
from esper.blueprints.rules import BlueprintValidationError
from esper.contracts.base import Contract
from esper.contracts.enums import LayerKind

FORMAT = "esper.blueprint/1"
# Bounds that keep a hostile IR cheap to reject; the validator's budget is the real size limit.
MAX_IR_BYTES = 1 << 20
MAX_SCHEMA_NODES = 256

Identifier = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class WidthRef(Contract):
    """A width proportional to the interface: ceil(factor x in_features (or out_features))."""

    mult_of: Literal["in", "out"]
    factor: Annotated[float, Field(gt=0, le=MAX_FACTOR, allow_inf_nan=False)]


def _attr_value(value: Any) -> Any:
    # One clear message instead of pydantic's per-member union errors.
    if isinstance(value, (WidthRef, bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
        return value
    if isinstance(value, dict):
        try:
            return WidthRef.model_validate(value)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"a width reference is {{\"mult_of\": \"in\"|\"out\", \"factor\": F in "
                             f"(0, {MAX_FACTOR}]}}: {err['msg']}") from None
    raise ValueError('an attribute is a bool, a number, a string or {"mult_of": ..., "factor": ...}')


AttrValue = Annotated[Any, PlainValidator(_attr_value)]


class Node(Contract):
    id: Identifier
    op: Identifier
    inputs: list[Identifier] = Field(default_factory=list, max_length=8)
    attrs: dict[Identifier, AttrValue] = Field(default_factory=dict, max_length=16)


class BlueprintIR(Contract):
    format: Literal["esper.blueprint/1"]
    name: Identifier
    description: str = Field(default="", max_length=2000)
    interface_kind: LayerKind
    nodes: list[Node] = Field(min_length=1, max_length=MAX_SCHEMA_NODES)

    def node(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def needs_sequence(self) -> bool:
        """True when the blueprint attends over dim -2: its input must be (..., T, C)."""
        return any(node.op == "attention_head" for node in self.nodes)


def load_ir(data: bytes | str, source: str = "") -> BlueprintIR:
    """Parse IR JSON. Malformed JSON or a schema error is a one-line BlueprintValidationError
    (rule `json` or `schema`) naming the source, the node where there is one, and the field."""
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    if size > MAX_IR_BYTES:
        raise BlueprintValidationError("schema", f"the IR is {size} bytes; the limit is {MAX_IR_BYTES}",
                                       source=source)
    try:
        return BlueprintIR.model_validate_json(data)  # one parse when the IR is good
    except ValidationError as e:
        error = e
    # A bad IR: the standard parser says whether it is JSON at all, and finds the node's id.
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BlueprintValidationError("json", f"malformed JSON: {e}", source=source) from None
    raise _schema_error(error, raw, source) from None


def _schema_error(e: ValidationError, raw: Any, source: str) -> BlueprintValidationError:
    err = e.errors()[0]
    loc = err["loc"]
    node = None
    if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
        try:
            node_id = raw["nodes"][loc[1]]["id"]
            node = node_id if isinstance(node_id, str) else None
        except (KeyError, IndexError, TypeError):
            pass
    field = ".".join(str(part) for part in loc) or "(root)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return BlueprintValidationError("schema", f"field '{field}': {err['msg']}{more}", node=node,
                                    source=source)
