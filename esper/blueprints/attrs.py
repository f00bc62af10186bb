"""Attribute checking (rule `attrs`) and resolution against a concrete interface."""

from __future__ import annotations

import math
from fractions import Fraction

from esper.blueprints.ir import Node, WidthRef
from esper.blueprints.ops import MAX_STRIDE, MAX_WIDTH, OPS, AttrKind, AttrSpec
from esper.blueprints.rules import BlueprintValidationError
from esper.contracts.assets import KernelInterface

# A scale's starting gain; bounded so a typo (1e30) is caught before it overflows in training.
MAX_NUMBER = 1e6

_EXPECTED = {
    AttrKind.WIDTH: f'a positive int up to {MAX_WIDTH}, "in", "out" or {{"mult_of": "in"|"out", '
                    '"factor": F}',
    AttrKind.STRIDE: f'an int from 1 to {MAX_STRIDE} or "interface"',
    AttrKind.BOOL: "true or false",
    AttrKind.PROBABILITY: "a number in [0, 1)",
    AttrKind.NUMBER: f"a number of magnitude at most {MAX_NUMBER:g}",
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid(kind: AttrKind, value: object) -> bool:
    if kind is AttrKind.WIDTH:
        if isinstance(value, WidthRef):
            return True
        if isinstance(value, str):
            return value in ("in", "out")
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_WIDTH
    if kind is AttrKind.STRIDE:
        if isinstance(value, str):
            return value == "interface"
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_STRIDE
    if kind is AttrKind.BOOL:
        return isinstance(value, bool)
    if kind is AttrKind.PROBABILITY:
        return _is_number(value) and 0 <= value < 1
    return _is_number(value) and abs(value) <= MAX_NUMBER


def check_attrs(node: Node) -> None:
    """Rule `attrs`: every attribute is one the op takes, of its type and in range."""
    specs = OPS[node.op].attrs
    for key, value in node.attrs.items():
        if key not in specs:
            takes = ", ".join(sorted(specs)) or "none"
            raise BlueprintValidationError(
                "attrs", f"{node.op} has no attribute '{key}' (it takes: {takes})", node=node.id)
        if not _valid(specs[key].kind, value):
            raise BlueprintValidationError(
                "attrs", f"attribute '{key}' of {node.op} must be {_EXPECTED[specs[key].kind]}, "
                         f"got {value!r}", node=node.id)
    for key, spec in specs.items():
        if spec.required and key not in node.attrs:
            raise BlueprintValidationError("attrs", f"{node.op} needs attribute '{key}'", node=node.id)


def resolve_attrs(node: Node, interface: KernelInterface) -> dict[str, int | float | bool]:
    """The node's attributes as concrete values for `interface`, defaults filled in."""
    resolved: dict[str, int | float | bool] = {}
    for key, spec in OPS[node.op].attrs.items():
        value = node.attrs.get(key, spec.default)
        resolved[key] = _resolve(spec, value, interface)
    return resolved


def _resolve(spec: AttrSpec, value: object, interface: KernelInterface) -> int | float | bool:
    if spec.kind is AttrKind.WIDTH:
        return resolve_width(value, interface)
    if spec.kind is AttrKind.STRIDE:
        return interface.stride if value == "interface" else int(value)
    return value


def resolve_width(value: object, interface: KernelInterface) -> int:
    if isinstance(value, WidthRef):
        base = interface.in_features if value.mult_of == "in" else interface.out_features
        # Fraction(str(...)): the decimal as written, so 0.1 x 30 is exactly 3, not 4.
        return math.ceil(Fraction(str(value.factor)) * base)
    if value == "in":
        return interface.in_features
    if value == "out":
        return interface.out_features
    return int(value)
