"""Every rule of the static check fires, on a hand-made bad IR, with its name and its node."""

from __future__ import annotations

import json

import pytest

from esper.blueprints import (
    RULES,
    BlueprintValidationError,
    Budget,
    load_ir,
    validate,
)
from esper.contracts.assets import KernelInterface


def make_ir(*nodes, kind: str = "linear"):
    """An IR from (id, op, inputs, attrs) tuples; attrs and inputs may be left off."""
    listed = []
    for spec in nodes:
        node_id, op, inputs, attrs = (*spec, [], {})[:4]
        listed.append({"id": node_id, "op": op, "inputs": list(inputs), "attrs": dict(attrs)})
    data = {"format": "esper.blueprint/1", "name": "case", "interface_kind": kind, "nodes": listed}
    return load_ir(json.dumps(data))


def mlp(*middle, last=("proj", "linear", ["act"], {"out": "out"})):
    """input x -> hidden (linear 16) -> act (relu) -> *middle -> last -> output y."""
    return [("x", "input"), ("hidden", "linear", ["x"], {"out": 16}), ("act", "relu", ["hidden"]),
            *middle, last, ("y", "output", [last[0]])]


CONV = [("x", "input"), ("conv", "conv3x3", ["x"], {"out": 8, "stride": "interface", "bias": False}),
        ("bn", "batch_norm", ["conv"]), ("act", "relu", ["bn"]),
        ("proj", "conv1x1", ["act"], {"out": "out"}), ("y", "output", ["proj"])]


def replace(nodes, node_id, *new):
    return [new if spec[0] == node_id else spec for spec in nodes]


# (case id, rule, node, IR nodes, ir kind, validate kwargs, fragment of the message)
CASES = [
    ("duplicate_id", "duplicate_id", "act", mlp(("act", "gelu", ["act"])), "linear", {}, "two nodes"),
    ("unknown_op", "op_whitelist", "act", replace(mlp(), "act", "act", "softmax", ["hidden"]),
     "linear", {}, "unknown op 'softmax'"),
    ("code_as_op", "op_whitelist", "act", replace(mlp(), "act", "act", "eval", ["hidden"]),
     "linear", {}, "unknown op 'eval'"),
    ("no_input", "single_input", None, replace(mlp(), "x", "x", "relu", ["hidden"]), "linear", {},
     "has 0"),
    ("two_inputs", "single_input", "x2", mlp(("x2", "input")), "linear", {}, "has 2"),
    ("no_output", "single_output", None, mlp()[:-1], "linear", {}, "has 0"),
    ("two_outputs", "single_output", "y2", mlp() + [("y2", "output", ["proj"])], "linear", {},
     "has 2"),
    ("dangling_ref", "unknown_ref", "act", replace(mlp(), "act", "act", "relu", ["ghost"]),
     "linear", {}, "'ghost' names no node"),
    ("reads_output", "terminal_output", "z", mlp(("z", "relu", ["y"])), "linear", {},
     "feeds nothing"),
    ("add_one_input", "arity", "act", replace(mlp(), "act", "act", "add", ["hidden"]), "linear", {},
     "add takes 2 input(s), got 1"),
    ("input_with_input", "arity", "x", replace(mlp(), "x", "x", "input", ["act"]), "linear", {},
     "input takes 0"),
    ("negative_width", "attrs", "hidden", replace(mlp(), "hidden", "hidden", "linear", ["x"],
                                                  {"out": -3}), "linear", {}, "got -3"),
    ("float_width", "attrs", "hidden", replace(mlp(), "hidden", "hidden", "linear", ["x"],
                                               {"out": 16.0}), "linear", {}, "got 16.0"),
    ("bool_width", "attrs", "hidden", replace(mlp(), "hidden", "hidden", "linear", ["x"],
                                              {"out": True}), "linear", {}, "got True"),
    ("missing_width", "attrs", "hidden", replace(mlp(), "hidden", "hidden", "linear", ["x"]),
     "linear", {}, "needs attribute 'out'"),
    ("unknown_attr", "attrs", "act", replace(mlp(), "act", "act", "relu", ["hidden"], {"slope": 1}),
     "linear", {}, "relu has no attribute 'slope'"),
    ("dropout_p_1", "attrs", "drop", mlp(("drop", "dropout", ["act"], {"p": 1.0}),
                                         last=("proj", "linear", ["drop"], {"out": "out"})),
     "linear", {}, "[0, 1)"),
    ("stride_0", "attrs", "conv", replace(CONV, "conv", "conv", "conv3x3", ["x"],
                                          {"out": 8, "stride": 0, "bias": False}), "conv2d", {},
     "stride"),
    ("conv_on_features", "edge_type", "act", replace(mlp(), "act", "act", "conv3x3", ["hidden"],
                                                     {"out": 16}), "linear", {},
     "conv3x3 consumes feature maps (B, C, H, W), but a linear blueprint carries features"),
    ("layer_norm_on_maps", "edge_type", "bn", replace(CONV, "bn", "bn", "layer_norm", ["conv"]),
     "conv2d", {}, "layer_norm consumes features"),
    ("cycle", "acyclic", "hidden", [("x", "input"), ("hidden", "add", ["x", "loop"]),
                                 ("act", "relu", ["hidden"]), ("loop", "linear", ["act"], {"out": "in"}),
                                 ("proj", "linear", ["act"], {"out": "out"}), ("y", "output", ["proj"])],
     "linear", {}, "a cycle: hidden -> act -> loop -> hidden"),
    ("self_loop", "acyclic", "act", replace(mlp(), "act", "act", "add", ["hidden", "act"]),
     "linear", {}, "act -> act"),
    ("dead_branch", "dead_node", "unused", mlp(("unused", "linear", ["x"], {"out": 4})), "linear",
     {}, "never reaches the output"),
    ("relu_last", "zero_init", "act", mlp()[:3] + [("y", "output", ["act"])], "linear", {},
     "relu cannot start at zero"),
    ("norm_last", "zero_init", "norm", mlp(last=("norm", "layer_norm", ["act"])), "linear", {},
     "layer_norm cannot start at zero"),
    ("bias_before_bn", "redundant_bias", "conv", replace(CONV, "conv", "conv", "conv3x3", ["x"],
                                                         {"out": 8, "stride": "interface"}),
     "conv2d", {}, "feeds only batch_norm"),
    ("too_many_nodes", "node_count", None, mlp(), "linear", {"budget": Budget(max_nodes=4)},
     "5 nodes; the budget allows 4"),
    ("too_deep", "depth", None, mlp(), "linear", {"budget": Budget(max_depth=2)},
     "3 ops; the budget allows 2"),
    ("fixed_width_output", "interface", "y", mlp(last=("proj", "linear", ["act"], {"out": 16})),
     "linear", {}, "at linear:37:5: the output is (..., 16), the interface needs (..., 5)"),
    ("fixed_stride", "interface", "y", replace(CONV, "conv", "conv", "conv3x3", ["x"],
                                               {"out": 8, "stride": 2, "bias": False}), "conv2d", {},
     "at conv2d:16:8:1: the output is (B, 8, H/2, W/2), the interface needs (B, 8, H, W)"),
    ("wrong_kind", "interface", None, mlp(), "linear",
     {"interface": KernelInterface.parse("conv2d:4:4:1")}, "cannot plug into a conv2d host"),
    ("unequal_add", "shape", "sum", [("x", "input"), ("a", "linear", ["x"], {"out": 16}),
                                     ("b", "linear", ["x"], {"out": 8}), ("sum", "add", ["a", "b"]),
                                     ("proj", "linear", ["sum"], {"out": "out"}),
                                     ("y", "output", ["proj"])], "linear", {},
     "at linear:64:16: add needs equal inputs, got (..., 16) and (..., 8)"),
    ("unequal_strides", "shape", "sum", [("x", "input"),
                                         ("a", "conv1x1", ["x"], {"out": 8, "stride": "interface"}),
                                         ("b", "conv1x1", ["x"], {"out": 8}), ("sum", "mul", ["a", "b"]),
                                         ("proj", "conv1x1", ["sum"], {"out": "out"}),
                                         ("y", "output", ["proj"])], "conv2d", {},
     "at conv2d:16:8:2: mul needs equal inputs, got (B, 8, H/2, W/2) and (B, 8, H, W)"),
    ("input_sized_width_only_fits_some", "shape", "sum",
     [("x", "input"), ("a", "linear", ["x"], {"out": 16}), ("sum", "add", ["a", "x"]),
      ("proj", "linear", ["sum"], {"out": "out"}), ("y", "output", ["proj"])], "linear",
     {"interface": KernelInterface.parse("linear:37:5")}, "got (..., 16) and (..., 37)"),
    ("params", "param_budget", None, mlp(), "linear", {"budget": Budget(max_params=100)},
     "at linear:64:16: 1312 parameters; the budget allows 100"),
    ("flops", "flop_budget", None, mlp(), "linear", {"budget": Budget(max_flops_per_position=100)},
     "FLOPs per input position; the budget allows 100"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_fires_with_its_name_and_node(case):
    _, rule, node, nodes, kind, kwargs, fragment = case
    ir = make_ir(*nodes, kind=kind)
    with pytest.raises(BlueprintValidationError) as info:
        validate(ir, source="case.json", **kwargs)
    e = info.value
    assert (e.rule, e.node) == (rule, node), str(e)
    message = str(e)
    where = f"node '{node}': " if node else ""
    assert message.startswith(f"case.json: {where}rule '{rule}': "), message
    assert fragment in message and "\n" not in message


def test_every_rule_has_a_case():
    covered = {case[1] for case in CASES} | {"json", "schema"}  # those two: test_blueprints_ir
    assert covered == set(RULES)


def test_unknown_op_message_matches_the_documented_form():
    ir = make_ir(*replace(mlp(), "act", "act", "softmax", ["hidden"]))
    with pytest.raises(BlueprintValidationError) as info:
        validate(ir)
    assert str(info.value) == "node 'act': rule 'op_whitelist': unknown op 'softmax'"


def test_a_valid_ir_reports_shapes_costs_and_depth():
    ir = make_ir(*CONV, kind="conv2d")
    result = validate(ir, KernelInterface.parse("conv2d:6:10:2"))
    (check,) = result.checks
    assert [str(check.nodes[n].shape) for n in result.order] == [
        "(B, 6, H, W)", "(B, 8, H/2, W/2)", "(B, 8, H/2, W/2)", "(B, 8, H/2, W/2)",
        "(B, 10, H/2, W/2)", "(B, 10, H/2, W/2)"]
    assert result.order == ["x", "conv", "bn", "act", "proj", "y"]
    # conv 9*6*8, bn 2*8, proj 8*10 + 10
    assert check.param_count == 432 + 16 + 90
    # per input pixel: conv 2*9*6*8/4, bn 5*8/4, relu 8/4, proj 2*8*10/4
    assert check.flops_per_position == 216 + 10 + 2 + 40
    assert (result.depth, result.zero_init_node, result.needs_sequence) == (4, "proj", False)
    assert json.loads(json.dumps(result.to_jsonable()))["checks"][0]["interface"]["kind"] == "conv2d"


def test_mult_of_widths_round_up_from_the_written_decimal():
    nodes = replace(mlp(), "hidden", "hidden", "linear", ["x"], {"out": {"mult_of": "out", "factor": 0.1}})
    check = validate(make_ir(*nodes), KernelInterface.parse("linear:7:30")).checks[0]
    assert check.nodes["hidden"].shape.channels == 3  # 0.1 x 30 in floating point is 3.0000000000000004
    check = validate(make_ir(*nodes), KernelInterface.parse("linear:7:31")).checks[0]
    assert check.nodes["hidden"].shape.channels == 4
