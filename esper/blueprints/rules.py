"""The rules of the static check ("jank check", HLD J.3.1) and the error that names them."""

from __future__ import annotations

from esper.errors import BadInputError

# Every rule a blueprint can break, and what it demands.
RULES: dict[str, str] = {
    "json": "the IR is valid UTF-8 JSON",
    "schema": "the IR has the blueprint schema (format tag, names, node fields, value types)",
    "duplicate_id": "node ids are unique",
    "op_whitelist": "every op is in the whitelist",
    "single_input": "exactly one node is the input",
    "single_output": "exactly one node is the output",
    "unknown_ref": "every input names an existing node",
    "terminal_output": "the output node feeds no other node",
    "arity": "every op has the number of inputs it needs",
    "attrs": "attributes are known to the op, of the right type and in range",
    "edge_type": "every op can consume the tensor kind of its inputs (features or feature maps)",
    "acyclic": "the graph has no cycle",
    "dead_node": "every node's result reaches the output",
    "zero_init": "the node feeding the output is an op the builder zero-initialises",
    "redundant_bias": "no biased op feeds only batch norms (its bias could never learn)",
    "node_count": "the graph has no more nodes than the budget",
    "depth": "the longest input-to-output path is within the budget",
    "interface": "the output matches the interface (width and stride); the interface kind matches",
    "shape": "the inputs of every op have the shapes it needs",
    "param_budget": "the parameter count is within the budget",
    "flop_budget": "the FLOPs per input position are within the budget",
}


class BlueprintValidationError(BadInputError):
    """A blueprint broke a rule: names the node (or None for the whole graph) and the rule.

    The message is one line: `SOURCE: node 'h1': rule 'shape': add needs equal inputs, ...`.
    """

    def __init__(self, rule: str, detail: str, *, node: str | None = None,
                 source: str = "", interface: str | None = None) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown blueprint rule {rule!r}")
        self.rule = rule
        self.node = node
        self.detail = detail
        self.source = source
        self.interface = interface
        parts = [f"{source}: " if source else "", f"node '{node}': " if node is not None else "",
                 f"rule '{rule}': ", f"at {interface}: " if interface else "", detail]
        super().__init__("".join(parts).replace("\n", " "))

    def with_source(self, source: str) -> BlueprintValidationError:
        """The same error, its message prefixed by where the IR came from."""
        if not source or self.source:
            return self
        return BlueprintValidationError(self.rule, self.detail, node=self.node, source=source,
                                        interface=self.interface)
