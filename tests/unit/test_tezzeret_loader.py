"""The verifying loader's own parsing: the weights file's layout is checked as strictly as the
safetensors library checks it, and read into tensors exactly as it reads them."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from esper.blueprints import standard_library
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


def _verified(ir, face: str, state: dict, dtype: str = "float32"):
    """What `_rebuild` reads of a verified load: the manifest's weights digest and dtype, the
    weights file's bytes, the blueprint's skeleton."""
    import hashlib
    from types import SimpleNamespace

    from esper.blueprints import blueprint_id, build_empty
    from esper.contracts import KernelInterface
    from pipelines.tezzeret.compile import WEIGHTS_FILE
    from pipelines.tezzeret.loader import _Skeleton

    data = bytearray(save(state))
    skeleton = _Skeleton.of(build_empty(ir, KernelInterface.parse(face), blueprint_id(ir),
                                        unfilled=True))
    return SimpleNamespace(
        record=SimpleNamespace(id="k"), skeleton=skeleton, files={WEIGHTS_FILE: data},
        manifest=SimpleNamespace(files={WEIGHTS_FILE: hashlib.sha256(data).hexdigest()},
                                 dtype=dtype))


@pytest.mark.parametrize("ir", standard_library(), ids=lambda ir: ir.name)
def test_a_rebuilt_kernel_is_the_built_module_with_its_weights(ir):
    """The skeleton filled by the cached plan computes what the module it was saved from
    computes, bit for bit, every tensor in its slot as a Parameter or buffer; a second load
    uses the plan the first made."""
    from esper.blueprints import build
    from esper.contracts import KernelInterface
    from pipelines.tezzeret.loader import _rebuild

    face = "linear:37:11" if ir.interface_kind.value == "linear" else "conv2d:6:10:2"
    built = build(ir, KernelInterface.parse(face), seed=1).eval()
    with torch.no_grad():  # the zero-initialised last op would make every output 0
        for p in built.parameters():
            p.copy_(torch.randn_like(p))
    state = {k: t.contiguous() for k, t in built.state_dict().items()}
    verified = _verified(ir, face, state)
    for _ in range(2):
        module = _rebuild(verified, "cpu").eval()
        got = module.state_dict(keep_vars=True)
        assert list(got) == list(built.state_dict())
        for name, tensor in built.state_dict(keep_vars=True).items():
            assert type(got[name]) is type(tensor) and got[name].requires_grad == tensor.requires_grad
            assert torch.equal(got[name], tensor), name
        x = (torch.randn(2, 5, 37) if ir.needs_sequence else torch.randn(4, 37)) \
            if face.startswith("linear") else torch.randn(2, 6, 7, 7)
        assert torch.equal(module(x), built(x))
    assert len(verified.skeleton.fills) == 1


def test_a_rebuild_casts_to_the_manifests_dtype_and_refuses_weights_that_do_not_fit():
    from pipelines.tezzeret.loader import _rebuild

    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    state = {"layers.0.weight": torch.randn(8, 37), "layers.0.bias": torch.randn(8),
             "layers.2.weight": torch.randn(11, 8), "layers.2.bias": torch.randn(11)}
    half = {k: t.bfloat16() for k, t in state.items()}
    module = _rebuild(_verified(ir, "linear:37:11", half, dtype="float32"), "cpu")
    assert all(t.dtype is torch.float32 and torch.equal(t, half[k].float())
               for k, t in module.state_dict().items())
    missing = {k: t for k, t in state.items() if k != "layers.2.bias"}
    with pytest.raises(IntegrityError, match=r"does not fit the blueprint: missing \['layers.2.bias'\]"):
        _rebuild(_verified(ir, "linear:37:11", missing), "cpu")
    wrong = state | {"layers.2.bias": torch.randn(12)}
    with pytest.raises(IntegrityError, match="layers.2.bias has shape \\[12\\]"):
        _rebuild(_verified(ir, "linear:37:11", wrong), "cpu")


@pytest.mark.parametrize("mixed", [False, True], ids=["one dtype", "mixed dtypes"])
def test_the_one_copy_path_gives_the_tensors_the_file_holds(mixed):
    """The path a GPU load takes (one copy of the data section, then views: split when the
    tensors share a dtype, one view each otherwise), run here on the CPU, gives each tensor the
    file holds, in the plan's order."""
    from pipelines.tezzeret.loader import _device_tensors, _fill_plan

    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    state = {"layers.0.weight": torch.randn(8, 37), "layers.0.bias": torch.randn(8),
             "layers.2.weight": torch.randn(11, 8), "layers.2.bias": torch.randn(11)}
    if mixed:  # safetensors puts it after the 4-byte ones (no view starts misaligned)
        state["layers.0.bias"] = state["layers.0.bias"].bfloat16()
    verified = _verified(ir, "linear:37:11", state)
    plan = _fill_plan(verified)
    assert [t.begin for t in plan.tensors] == sorted(t.begin for t in plan.tensors)
    tensors = _device_tensors(verified.files["weights.safetensors"], plan, torch.device("cpu"))
    slots = {(s.owner, s.attr): name for name, s in verified.skeleton.slots.items()}
    for t, tensor in zip(plan.tensors, tensors, strict=True):
        assert torch.equal(tensor, state[slots[(t.owner, t.attr)]])
