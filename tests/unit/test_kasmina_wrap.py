"""wrap(model, config): target selection, chunking, the report, and config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper
import kasmina
from esper.contracts import KernelInterface, LayerKind
from esper.errors import BadInputError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.odd = nn.Conv2d(8, 8, 2)  # no "same" geometry: not a seed host
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.odd(self.down(torch.relu(self.stem(x))))
        x = x.mean(dim=(2, 3))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _paths(report):
    return [layer.path for layer in report.layers]


def test_default_wraps_every_linear_and_preserves_the_function():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 9, 9)
    want = net(x)
    model, report = esper.wrap(net, {"seeds_per_layer": 2})
    assert _paths(report) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    assert [layer.layer_id for layer in report.layers] == [0, 1, 2, 3, 4]
    assert report.layers[0].interface == KernelInterface(kind=LayerKind.LINEAR, in_features=8, out_features=8)
    assert torch.equal(model(x), want)
    assert report.seeds == 10 and len(report.interfaces) == 3


def test_conv_targets_carry_the_stride_and_odd_geometry_is_skipped():
    model, report = kasmina.wrap(Net(), {"targets": ["conv2d"], "chunk_width": 4})
    assert _paths(report) == ["stem", "down"]
    assert report.layers[1].interface == KernelInterface(kind=LayerKind.CONV2D, in_features=8,
                                                         out_features=4, stride=2)
    assert report.skipped and report.skipped[0][0] == "odd"
    model(torch.randn(1, 3, 8, 8))


def test_patterns_glob_regex_exclude_and_named_blocks():
    _, report = kasmina.wrap(Net(), {"include": ["blocks.*.fc1"], "seeds_per_layer": 4})
    assert _paths(report) == ["blocks.0.fc1", "blocks.1.fc1"]
    _, report = kasmina.wrap(Net(), {"include": [r"re:blocks\.1\..*"], "exclude": ["*.fc2"]})
    assert _paths(report) == ["blocks.1.fc1"]
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 9, 9)
    want = net(x)
    model, report = kasmina.wrap(net, {"blocks": {"blocks.0": {"kind": "linear", "in_features": 8,
                                                                "out_features": 8}},
                                       "include": ["head"], "seeds_per_layer": 2})
    assert _paths(report) == ["blocks.0", "head"]
    assert isinstance(model.blocks[0], kasmina.KasminaLayer)
    assert isinstance(model.blocks[0].host.fc1, nn.Linear)  # inside a claimed block: untouched
    assert torch.equal(model(x), want)


def test_a_block_without_declared_sizes_takes_its_own():
    from esper.tolaria.models import MLP
    torch.manual_seed(0)
    model = MLP((40,), 10, widths=[16, 12], spans=True)
    x = torch.randn(3, 40)
    want = model(x)
    model, report = kasmina.wrap(model, {"include": ["layers.*"], "seeds_per_layer": 1,
                                         "blocks": {"spans.*": {"kind": "linear"}}})
    assert _paths(report) == ["layers.0", "layers.1", "spans.0", "spans.1"]
    assert [(w.interface.in_features, w.interface.out_features) for w in report.layers[2:]] == [(40, 12), (16, 10)]
    assert torch.equal(model(x), want)
    with pytest.raises(BadInputError, match="block blocks.0: give its in_features .the Block has no in_features"):
        kasmina.wrap(Net(), {"blocks": {"blocks.0": {"kind": "linear"}}})


def test_config_errors_name_the_field_and_bad_chunking_is_refused():
    with pytest.raises(BadInputError, match="field 'telemetry.every'"):
        kasmina.wrap(Net(), {"telemetry": {"every": 0}})
    with pytest.raises(BadInputError, match="field 'targets.0'"):
        kasmina.wrap(Net(), {"targets": ["lstm"]})
    with pytest.raises(BadInputError, match="exactly one of seeds_per_layer and chunk_width"):
        kasmina.wrap(Net(), {"seeds_per_layer": 2, "chunk_width": 4})
    with pytest.raises(BadInputError, match="chunk_width 3 does not divide"):
        kasmina.wrap(Net(), {"chunk_width": 3})
    with pytest.raises(BadInputError, match="cannot wrap odd"):
        kasmina.wrap(Net(), {"targets": ["conv2d"], "include": ["odd"]})


@pytest.mark.parametrize(("config", "expected"), [
    ({"include": ["blocks.*.fc1", "blocks.*.fc3"]},
     ("field 'kasmina.include': 'blocks.*.fc3' matches no linear module of the model (it has "
      "blocks.0.fc1, blocks.0.fc2, blocks.1.fc1, blocks.1.fc2, head)")),
    ({"targets": ["conv2d"], "include": ["re:up|dwn"], "chunk_width": 4},
     "field 'kasmina.include': 're:up|dwn' matches no conv2d module of the model (it has stem, down, odd)"),
    ({"exclude": ["heads"]}, "field 'kasmina.exclude': 'heads' matches no module kasmina selects"),
    ({"exclude": ["blocks"]}, "field 'kasmina.exclude': 'blocks' matches no module kasmina selects"),
    ({"blocks": {"block.0": {"kind": "linear", "in_features": 8, "out_features": 8}}},
     ("field 'kasmina.blocks': 'block.0' matches no module of the model (it has stem, down, odd, "
      "blocks, blocks.0, blocks.0.fc1, ...)")),
], ids=["include", "include-conv", "exclude", "exclude-a-container", "blocks"])
def test_a_pattern_that_matches_nothing_is_refused_and_the_model_left_alone(config, expected):
    """A typo'd pattern would train without the seeds it asked for (include, blocks) or with
    the ones it meant to keep out (exclude): one line naming the field, the pattern and the
    model's paths. An exclude matching only a container excludes nothing (patterns match one
    module's own path), so it is refused too."""
    net = Net()
    with pytest.raises(BadInputError) as raised:
        kasmina.wrap(net, config)
    assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)
    assert kasmina.layers(net) == [] and isinstance(net.head, nn.Linear)


def test_empty_targets_wrap_no_module_but_the_named_blocks():
    """`targets: []` is how a config says "no seeds"; with `blocks` it wraps only those. An
    include or exclude the config also holds (quickstart.yaml's, say) has nothing to narrow."""
    for config in ({"targets": []}, {"targets": [], "include": ["head"], "exclude": ["nope"]}):
        model, report = kasmina.wrap(Net(), config)
        assert report.layers == [] and kasmina.layers(model) == []
    _, report = kasmina.wrap(Net(), {"targets": [], "seeds_per_layer": 2,
                                     "blocks": {"blocks.*": {"kind": "linear", "in_features": 8,
                                                             "out_features": 8}}})
    assert _paths(report) == ["blocks.0", "blocks.1"]


def test_a_config_an_earlier_version_wrote_rebuilds_unchecked(tmp_path):
    """Earlier versions spelled "no seeds" `include: ["no-layer"]` (a pattern matching nothing);
    `check_patterns=False` rebuilds such a model as it was made, and an export of one loads."""
    from esper.tolaria.export import load_model, save_model
    from esper.tolaria.models import MLP

    old = {"include": ["no-layer"], "seeds_per_layer": 1, "blocks": {"spans.*": {"kind": "linear"}}}
    with pytest.raises(BadInputError, match="'kasmina.include': 'no-layer' matches no linear"):
        kasmina.wrap(MLP((4,), 3, widths=[8], spans=True), old)
    torch.manual_seed(0)
    model, report = kasmina.wrap(MLP((4,), 3, widths=[8], spans=True), old, check_patterns=False)
    assert _paths(report) == ["spans.0"]
    x = torch.randn(5, 4)
    want = model.eval()(x)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, host=MLP((4,), 3, widths=[8], spans=True))
    assert [layer.layer_name for layer in kasmina.layers(loaded)] == ["spans.0"]
    assert torch.equal(loaded(x), want)


def test_a_bare_linear_model_is_itself_wrapped():
    model, report = kasmina.wrap(nn.Linear(4, 6), {"seeds_per_layer": 3})
    assert isinstance(model, kasmina.KasminaLayer) and _paths(report) == [""]


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layers_wrap_only_the_linears_they_call(batch_first):
    """nn.MultiheadAttention reads out_proj.weight itself, and nn.TransformerEncoderLayer with
    batch_first reads linear1 and linear2's weights itself on its inference fast path: those are
    skipped with the reason; the wrapped model computes exactly what it did, in both modes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16),
                        nn.TransformerEncoderLayer(16, 4, 24, dropout=0.1, batch_first=batch_first),
                        nn.Linear(16, 4))
    x = torch.randn(3, 5, 6)
    want = {}
    for train in (True, False):
        net.train(train)
        torch.manual_seed(1)  # the same dropout masks in both models
        want[train] = net(x)
    model, report = kasmina.wrap(net, {"seeds_per_layer": 2})
    skipped = dict(report.skipped)
    assert "MultiheadAttention reads out_proj.weight" in skipped.pop("1.self_attn.out_proj")
    if batch_first:
        assert _paths(report) == ["0", "2"]
        assert all("fast path" in skipped.pop(f"1.linear{i}") for i in (1, 2))
    else:
        assert _paths(report) == ["0", "1.linear1", "1.linear2", "2"]
    assert not skipped
    for train in (True, False):
        model.train(train)
        torch.manual_seed(1)
        assert torch.equal(model(x), want[train])
    with pytest.raises(BadInputError, match="cannot wrap 1.self_attn.out_proj: nn.MultiheadAttention"):
        kasmina.wrap(nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoderLayer(16, 4, 24)),
                     {"include": ["1.self_attn.out_proj"]})


def test_config_imports_no_torch_and_wrap_stays_the_function():
    """The package resolves names lazily: a run's config needs no torch, and importing the
    submodule kasmina.wrap first does not hide the function kasmina.wrap."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; import kasmina.config; light = 'torch' not in sys.modules; "
            "from kasmina.wrap import WrapReport; import kasmina, torch; "
            "model, report = kasmina.wrap(torch.nn.Linear(4, 6), {'seeds_per_layer': 3}); "
            "print(light, isinstance(model, kasmina.KasminaLayer), kasmina.layer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["True", "True", "kasmina.layer"]
