"""The static check ("jank check", HLD J.3.1): a blueprint is checked once for the rules that
hold at any interface, then shape by shape for each interface it must fit."""

from __future__ import annotations

from esper.blueprints.budget import DEFAULT_BUDGET, Budget
from esper.blueprints.graph import Structure, check_structure
from esper.blueprints.hashing import blueprint_id
from esper.blueprints.ir import BlueprintIR
from esper.blueprints.rules import BlueprintValidationError
from esper.blueprints.shapes import InterfaceCheck, Resolved, infer, resolve
from esper.contracts.assets import KernelInterface
from esper.contracts.base import Contract
from esper.contracts.enums import LayerKind

# With no interface given, a blueprint must fit all of these: a wide and a narrow host, widths
# that are not powers of two, an expansion (in < out), and for conv hosts both strides, so a
# blueprint that only works at one size is caught before anything is compiled for it.
PROBE_INTERFACES: dict[LayerKind, tuple[KernelInterface, ...]] = {
    LayerKind.LINEAR: tuple(KernelInterface.parse(text) for text in
                            ("linear:64:16", "linear:37:5", "linear:5:37")),
    LayerKind.CONV2D: tuple(KernelInterface.parse(text) for text in
                            ("conv2d:16:8:1", "conv2d:16:8:2", "conv2d:5:12:1")),
}


class ValidationResult(Contract):
    """What the check found: the graph's facts and, per interface checked, shapes and costs."""

    blueprint_id: str
    name: str
    interface_kind: LayerKind
    order: list[str]  # topological, ties broken by id: the builder's layer order
    zero_init_node: str
    depth: int
    needs_sequence: bool
    checks: list[InterfaceCheck]

    @property
    def param_count(self) -> int:
        """The largest parameter count over the interfaces checked."""
        return max(check.param_count for check in self.checks)

    @property
    def flops_per_position(self) -> int:
        """The largest FLOPs per input position over the interfaces checked."""
        return max(check.flops_per_position for check in self.checks)


def validate(ir: BlueprintIR, interface: KernelInterface | None = None,
             budget: Budget = DEFAULT_BUDGET, *, source: str = "") -> ValidationResult:
    """Check `ir` for `interface`, or for every probe interface of its kind when none is given.

    Raises BlueprintValidationError (exit code 2) naming the first broken rule and its node,
    prefixed by `source` when given.
    """
    try:
        structure = check_structure(ir, budget)
        interfaces = (interface,) if interface is not None else PROBE_INTERFACES[ir.interface_kind]
        checks = [infer(ir, structure, each, budget) for each in interfaces]
    except BlueprintValidationError as e:
        raise e.with_source(source) from None
    return ValidationResult(
        blueprint_id=blueprint_id(ir), name=ir.name, interface_kind=ir.interface_kind,
        order=list(structure.order), zero_init_node=structure.zero_init_node,
        depth=structure.depth, needs_sequence=ir.needs_sequence, checks=checks)


def check(ir: BlueprintIR, interface: KernelInterface, budget: Budget = DEFAULT_BUDGET,
          *, source: str = "") -> tuple[Structure, dict[str, Resolved]]:
    """`validate` at one interface, every rule checked in the same order and raised the same way,
    without the result contracts (each node resolved as a tuple, `shapes.resolve`) and without
    hashing the IR: for the builder, whose callers either know the IR's id already (the
    verifying loader reads the IR by it) or hash it once."""
    try:
        structure = check_structure(ir, budget)
        return structure, resolve(ir, structure, interface, budget)[0]
    except BlueprintValidationError as e:
        raise e.with_source(source) from None
