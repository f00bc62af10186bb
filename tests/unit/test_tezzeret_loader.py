"""The verifying loader's own parsing: the weights file's layout is checked as strictly as the
safetensors library checks it, and read into tensors exactly as it reads them."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from esper.errors import IntegrityError
from pipelines.tezzeret.loader import _safetensors_layout, _tensor


def _file(header: dict, data: bytes) -> bytearray:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return bytearray(struct.pack("<Q", len(text)) + text + data)


def test_the_layout_reads_what_safetensors_reads():
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(5, 3), "a.bias": torch.randn(5).bfloat16(),
             "bn.num_batches_tracked": torch.tensor(7), "empty": torch.zeros(0, 4),
             "half": torch.randn(3, 1).half()}
    data = bytearray(save(state, metadata={"k": "v"}))
    start, entries = _safetensors_layout(data, "kernel k")
    assert entries.keys() == state.keys()
    for name, (dtype, shape, begin, end) in entries.items():
        tensor = _tensor(data, start + begin, start + end, getattr(torch, dtype), shape)
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name
    assert all(torch.equal(load(bytes(data))[n], t) for n, t in state.items())


@pytest.mark.parametrize(("header", "data", "why"), [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 7, "header"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "after the last"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "bytes for shape"),
    ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad entry"),
    ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad entry"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, b"\0" * 8, "bad entry"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gaps"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ([1, 2], b"", "not a JSON object"),
])
def test_a_malformed_layout_is_refused(header, data, why):
    blob = _file(header, data)
    if why == "header":  # a header that claims more bytes than the file has
        blob = blob[:8 + 4]
    with pytest.raises(IntegrityError, match="not a safetensors file") as e:
        _safetensors_layout(blob, "kernel k")
    assert why in str(e.value) or why == "header"


def test_a_header_that_is_not_json_is_refused():
    with pytest.raises(IntegrityError, match="not JSON"):
        _safetensors_layout(bytearray(struct.pack("<Q", 4) + b"{{{{"), "kernel k")


@pytest.mark.parametrize(("document", "digests"), [
    (json.dumps({"body": json.dumps({"files": {"weights.safetensors": "ab", "x": "cd"}})}), ("ab",)),
    (json.dumps({"body": json.dumps({"files": {"x": "cd"}})}), ()),
    (json.dumps({"body": json.dumps({"files": ["weights.safetensors"]})}), ()),
    (json.dumps({"body": json.dumps({"files": "weights.safetensors"})}), ()),
    (json.dumps({"body": {"files": {}}}), ()),
    (json.dumps([1]), ()),
    ("{", ()),
])
def test_the_read_ahead_hint_is_whatever_parses_and_nothing_else(document, digests):
    """The digests an unverified manifest document names, or none: a hint of what to read
    ahead, cached by the document's bytes (the load uses files under the verified digests only)."""
    from pipelines.tezzeret.loader import _named_files

    assert _named_files(document.encode(), ("weights.safetensors",)) == digests
    assert _named_files(document.encode(), ("weights.safetensors",)) == digests  # cached
