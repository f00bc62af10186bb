"""wrap() on models that are not a fresh tree of plain layers: a model wrapped before, a module
shared by two parents (tied), a chunk count one layer cannot take, and a model built on the meta
device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kasmina
from esper.blueprints import standard_library
from esper.contracts import SeedLifecycle as S
from esper.errors import BadInputError

LIBRARY = {ir.name: ir for ir in standard_library()}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class Tied(nn.Module):
    """One Linear called at two places of the forward (weight sharing, as in a recurrent step)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = nn.Linear(4, 4)
        self.first, self.second = shared, shared

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(path, type(m).__name__) for path, m in model.named_modules()]


def test_wrapping_a_wrapped_model_again_leaves_its_layers_and_their_hosts_alone():
    model, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 2})
    before = structure(model)
    model, again = kasmina.wrap(model, {"seeds_per_layer": 2})
    assert again.layers == [] and structure(model) == before  # no KasminaLayer inside another
    model, again = kasmina.wrap(model, {"seeds_per_layer": 2, "include": ["0", "2"]})
    assert again.layers == [] and structure(model) == before  # its include names its layers
    assert [layer.layer_id for layer in kasmina.layers(model)] == [0, 1]


def test_a_second_wrap_of_other_targets_numbers_its_layers_after_the_first():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 9, 4))
    model, first = kasmina.wrap(conv, {"seeds_per_layer": 2})
    model, second = kasmina.wrap(model, {"seeds_per_layer": 2, "targets": ["conv2d"]})
    assert [(w.path, w.layer_id) for w in first.layers + second.layers] == [("2", 0), ("0", 1)]
    assert sorted(layer.layer_id for layer in kasmina.layers(model)) == [0, 1]  # each its own


def test_an_include_naming_a_module_inside_a_kasmina_layer_is_refused():
    model, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 2})
    before = structure(model)
    with pytest.raises(BadInputError, match=r"cannot wrap 0\.host: it is inside the KasminaLayer 0"):
        kasmina.wrap(model, {"seeds_per_layer": 2, "include": ["0.host"]})
    assert structure(model) == before


def test_a_chunk_count_one_layer_cannot_take_leaves_the_whole_model_unwrapped():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(BadInputError, match="layer 2: seeds_per_layer 2 does not divide its 3"):
        kasmina.wrap(model, {"seeds_per_layer": 2})
    assert kasmina.layers(model) == [] and isinstance(model[0], nn.Linear)
    with pytest.raises(BadInputError, match=r"layer \(root\): seeds_per_layer 2"):
        kasmina.wrap(nn.Linear(4, 7), {"seeds_per_layer": 2})


def test_a_module_shared_by_two_parents_is_one_layer_at_both_places():
    model = Tied()
    x = torch.randn(5, 4)
    want = model(x)
    source = kasmina.BlueprintKernelSource()
    model, report = kasmina.wrap(model, {"seeds_per_layer": 2}, kernel_source=source)
    assert [w.path for w in report.layers] == ["first"]
    assert isinstance(model.first, kasmina.KasminaLayer) and model.second is model.first
    assert torch.equal(model(x), want)

    # A graft acts at both calls, as the shared module does (a wrap of one alias left the other
    # call on the bare Linear: half the model ignored the seed).
    layer = model.first
    graft(layer, source, seed=0, alpha=1.0, shift=0.5)
    host = layer.host
    grafted = model(x)
    once = host(torch.relu(layer(x)))  # the seed at the first call only
    assert not torch.allclose(grafted, once)
    restored, _ = kasmina.wrap(Tied(), {"seeds_per_layer": 2}, kernel_source=source)
    restored.load_state_dict(model.state_dict())
    assert restored.second is restored.first and torch.equal(restored(x), grafted)


def graft(layer, source, *, seed: int, alpha: float, shift: float) -> None:
    """Take `seed` of `layer` to GRAFTING with an mlp_gelu_w8 kernel, at `alpha`, its weights
    moved by `shift` off their zero-output start (so the graft changes the output)."""
    kernel = source.add(LIBRARY["mlp_gelu_w8"], layer.seed_interface)
    for stage in (S.GERMINATED, S.LOADING, S.GRAFTING):
        layer.transition(seed, stage, kernel_artifact_id=kernel if stage is S.GERMINATED else None)
    with torch.no_grad():
        layer.state.alpha.fill_(alpha)
        for p in layer.seed_parameters():
            p.add_(shift)


def grafted_mlp():
    """A wrapped mlp() whose layer 0 has a seed GRAFTING at alpha 0.5 with non-zero weights."""
    source = kasmina.BlueprintKernelSource()
    model, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 2}, kernel_source=source)
    graft(kasmina.layers(model)[0], source, seed=1, alpha=0.5, shift=0.25)
    return model, source


def test_a_model_wrapped_on_the_meta_device_is_materialized_by_to_empty():
    x = torch.randn(3, 4)
    trained, source = grafted_mlp()
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    model, _ = kasmina.wrap(skeleton, {"seeds_per_layer": 2}, kernel_source=source)
    assert model(torch.randn(3, 4, device="meta")).is_meta
    model = model.to_empty(device="cpu")  # was NotImplementedError: cannot copy out of meta
    model.load_state_dict(trained.state_dict())
    assert kasmina.layers(model)[0].stages == [S.DORMANT, S.GRAFTING]
    assert torch.equal(model(x), trained(x))
    assert all(layer.rollback_requested is None for layer in kasmina.layers(model))


def test_a_meta_wrap_given_host_weights_only_has_fresh_seed_state_not_garbage():
    host = mlp()
    x = torch.randn(3, 4)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    model, _ = kasmina.wrap(skeleton, {"seeds_per_layer": 2})
    model = model.to_empty(device="cpu")
    for i in (0, 2):
        model[i].host.load_state_dict(host[i].state_dict())
    assert torch.equal(model(x), host(x))
    # The seed state is the fresh one: no corrupt-state rollback at the first boundary.
    assert [layer.verify_state() for layer in kasmina.layers(model)] == [None, None]
    kasmina.on_epoch_end(model, 1)
    assert kasmina.rollback_requests(model) == []
    assert all(layer.stages == [S.DORMANT, S.DORMANT] for layer in kasmina.layers(model))


def _meta_bytes(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


@pytest.mark.parametrize("edit,named", [
    (lambda s: s.__setitem__("0.meta", _meta_bytes(b"\xff\x00garbage")), "0.meta: not a Kasmina"),
    (lambda s: s.__setitem__("0.meta", _meta_bytes(b"[1, 2]")), "0.meta: unknown format 'list'"),
    (lambda s: s.__setitem__("0.meta", _meta_bytes(b'{"format": "kasmina.layer/1"}')),
     "0.meta: kernel_table"),
    (lambda s: s.__setitem__("0.state.lifecycle", torch.zeros(3, dtype=torch.uint8)),
     r"0.state.lifecycle: \(3,\) values for 2 seeds"),
    (lambda s: s.__setitem__("0.state.lifecycle", torch.full((2,), 200, dtype=torch.uint8)),
     "0.state.lifecycle: a code that is no lifecycle stage"),
    (lambda s: s.__setitem__("0.state.kernel_slot", torch.full((2,), 7, dtype=torch.int32)),
     "0.state.kernel_slot: seed 1 names kernel 7 of the 1"),
])
def test_a_damaged_layer_record_is_named_by_load_state_dict(edit, named):
    """torch's own load error, naming the key (was a JSONDecodeError, KeyError, IndexError or
    ValueError from inside the layer's hook). The seeds are not rebuilt from the record; the
    tensors torch copies anyway are its business, and the checksum catches those."""
    trained, source = grafted_mlp()
    state = dict(trained.state_dict())
    edit(state)
    model, _ = kasmina.wrap(mlp(), {"seeds_per_layer": 2}, kernel_source=source)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=named):
            model.load_state_dict(state, strict=strict)
    assert kasmina.layers(model)[0].stages == [S.DORMANT, S.DORMANT]
