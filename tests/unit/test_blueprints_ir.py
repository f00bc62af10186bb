"""Parsing and hashing: load_ir's one-line errors, and an id that depends on the graph only."""

from __future__ import annotations

import hashlib
import json

import pytest

from esper.blueprints import (
    BlueprintValidationError,
    WidthRef,
    blueprint_id,
    canonical_json,
    load_ir,
    standard_library,
)
from esper.errors import BadInputError

MLP = {
    "format": "esper.blueprint/1", "name": "mlp_relu_w16", "interface_kind": "linear",
    "description": "x -> 16 ReLU units -> out",
    "nodes": [
        {"id": "x", "op": "input"},
        {"id": "hidden", "op": "linear", "inputs": ["x"], "attrs": {"out": 16, "bias": True}},
        {"id": "act", "op": "relu", "inputs": ["hidden"]},
        {"id": "proj", "op": "linear", "inputs": ["act"], "attrs": {"out": "out"}},
        {"id": "y", "op": "output", "inputs": ["proj"]},
    ],
}


def _load(data: dict):
    return load_ir(json.dumps(data))


def _reverse_keys(obj):
    if isinstance(obj, dict):
        return {k: _reverse_keys(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reverse_keys(v) for v in obj]
    return obj


def test_canonical_json_is_compact_sorted_utf8_and_the_id_is_its_sha256():
    ir = _load(MLP)
    data = canonical_json(ir)
    assert b" " not in data.replace(b"x -> 16 ReLU units -> out", b"")
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert blueprint_id(ir) == hashlib.sha256(data).hexdigest()


def test_reordered_keys_whitespace_and_node_order_give_the_same_id():
    reference = blueprint_id(_load(MLP))
    assert blueprint_id(_load(_reverse_keys(MLP))) == reference
    assert blueprint_id(load_ir(json.dumps(MLP, indent=4))) == reference
    shuffled = dict(MLP, nodes=[MLP["nodes"][i] for i in (3, 0, 4, 2, 1)])
    assert blueprint_id(_load(shuffled)) == reference


def test_canonical_json_round_trips_to_the_same_bytes():
    for ir in standard_library():
        data = canonical_json(ir)
        assert canonical_json(load_ir(data)) == data


@pytest.mark.parametrize("change", [
    lambda d: d.update(name="mlp_relu_w16b"),
    lambda d: d.update(description="other words"),
    lambda d: d["nodes"][1]["attrs"].update(out=17),
    lambda d: d["nodes"][1]["attrs"].update(bias=False),
    lambda d: d["nodes"][1]["attrs"].update(out={"mult_of": "in", "factor": 0.5}),
    lambda d: d["nodes"][2].update(op="gelu"),
    lambda d: d["nodes"][2].update(id="act2") or d["nodes"][3].update(inputs=["act2"]),
    lambda d: d["nodes"][1]["attrs"].pop("bias"),
], ids=["name", "description", "width", "bias", "width_ref", "op", "node_id", "default_written"])
def test_any_change_gives_a_different_id(change):
    data = json.loads(json.dumps(MLP))
    change(data)
    assert blueprint_id(_load(data)) != blueprint_id(_load(MLP))


def test_width_refs_parse_into_their_model():
    data = json.loads(json.dumps(MLP))
    data["nodes"][1]["attrs"]["out"] = {"mult_of": "in", "factor": 2}
    assert _load(data).node("hidden").attrs["out"] == WidthRef(mult_of="in", factor=2.0)


@pytest.mark.parametrize("text, rule, node, fragment", [
    (b'{"format": "esper.blueprint/1", "name": ', "json", None, "malformed JSON"),
    (b"\xff\xfe\x00garbage", "json", None, "malformed JSON"),
    (b"[" * 100_000, "json", None, "malformed JSON"),
    (b"[1, 2]", "schema", None, "field '(root)'"),
    (json.dumps({k: v for k, v in MLP.items() if k != "format"}).encode(), "schema", None,
     "field 'format': Field required"),
    (json.dumps(dict(MLP, format="esper.blueprint/2")).encode(), "schema", None, "field 'format'"),
    (json.dumps(dict(MLP, extra=1)).encode(), "schema", None, "field 'extra'"),
    (json.dumps(dict(MLP, interface_kind="conv3d")).encode(), "schema", None,
     "field 'interface_kind'"),
    (json.dumps(dict(MLP, name="Has Spaces")).encode(), "schema", None, "field 'name'"),
    (json.dumps(dict(MLP, nodes=[])).encode(), "schema", None, "field 'nodes'"),
])
def test_malformed_input_is_one_line_naming_source_and_field(text, rule, node, fragment):
    with pytest.raises(BlueprintValidationError) as info:
        load_ir(text, source="bad.json")
    e = info.value
    assert (e.rule, e.node) == (rule, node)
    assert isinstance(e, BadInputError) and e.exit_code == 2
    message = str(e)
    assert message.startswith(f"bad.json: rule '{rule}': ") and "\n" not in message
    assert fragment in message


@pytest.mark.parametrize("node_patch, field", [
    ({"inputs": "x"}, "nodes.1.inputs"),
    ({"attrs": {"out": [16]}}, "nodes.1.attrs.out"),
    ({"attrs": {"out": {"mult_of": "in", "factor": -1}}}, "nodes.1.attrs.out"),
    ({"attrs": {"out": {"mult_of": "hidden", "factor": 1}}}, "nodes.1.attrs.out"),
    ({"attrs": {"Out": 16}}, "nodes.1.attrs.Out.[key]"),
    ({"op": "Linear"}, "nodes.1.op"),
    ({"colour": "red"}, "nodes.1.colour"),
])
def test_schema_errors_inside_a_node_name_the_node(node_patch, field):
    data = json.loads(json.dumps(MLP))
    data["nodes"][1].update(node_patch)
    with pytest.raises(BlueprintValidationError) as info:
        load_ir(json.dumps(data), source="ir.json")
    assert (info.value.rule, info.value.node) == ("schema", "hidden")
    assert str(info.value).startswith(f"ir.json: node 'hidden': rule 'schema': field '{field}'")


def test_nan_is_refused():
    text = json.dumps(MLP).replace('"out": 16', '"out": NaN')
    with pytest.raises(BlueprintValidationError, match="finite") as info:
        load_ir(text)
    assert info.value.rule == "schema"


def test_oversized_ir_is_refused_before_parsing():
    text = json.dumps(dict(MLP, description="a" * (1 << 20)))
    with pytest.raises(BlueprintValidationError, match="limit") as info:
        load_ir(text)
    assert info.value.rule == "schema"
