"""The built-in model zoo: each model runs on the shapes of the built-in data sets, wraps with
kasmina.wrap without skipping a layer, and a dormant wrap changes no bit of its output or
gradients. User models by import path."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

import kasmina
from esper.errors import BadInputError
from esper.tolaria.models import ZOO, SmallCNN, Span, build_model

# (zoo name, kwargs, input shape): MNIST-1D (40,), digits (1, 8, 8), two spirals (2,), and more.
CASES = [
    ("mlp", {}, (2,)),
    ("mlp", {"widths": [12, 20, 8], "activation": "tanh"}, (40,)),
    ("mlp", {"activation": "gelu"}, (1, 8, 8)),
    ("mlp_narrow", {}, (2,)),
    ("cnn", {}, (40,)),
    ("cnn", {}, (1, 8, 8)),
    ("cnn", {"channels": [8, 8, 12], "kernel_size": 5, "hidden": 20}, (8, 8)),
    ("cnn", {}, (3, 5, 7)),
    ("transformer", {}, (40,)),
    ("transformer", {"d_model": 16, "heads": 2, "depth": 1, "patch": 5}, (40,)),
    ("transformer", {}, (1, 8, 8)),
    ("transformer", {"ff_mult": 3}, (6, 12)),
]


def _ids(case):
    name, kwargs, shape = case
    return f"{name}-{'x'.join(map(str, shape))}" + ("-kw" if kwargs else "")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_forward_shape(case):
    name, kwargs, shape = case
    torch.manual_seed(0)
    model = build_model({"name": name, "kwargs": kwargs}, shape, 10)
    for batch in (1, 7):
        assert model(torch.randn(batch, *shape)).shape == (batch, 10)


def test_regression_output_width():
    model = build_model("mlp", (16,), 4)
    assert model(torch.randn(3, 16)).shape == (3, 4)


def test_mlp_narrow_is_narrow():
    model = build_model("mlp_narrow", (2,), 2)
    assert [layer.out_features for layer in model.layers] == [8]
    assert [layer.out_features for layer in build_model(
        {"name": "mlp_narrow", "kwargs": {"width": 4}}, (2,), 2).layers] == [4]


def test_mlp_adapters_start_as_the_plain_mlp_and_then_learn():
    shape, widths = (40,), [16, 12]
    torch.manual_seed(0)
    plain = build_model({"name": "mlp", "kwargs": {"widths": widths}}, shape, 10)
    torch.manual_seed(0)
    adapted = build_model({"name": "mlp", "kwargs": {"widths": widths, "adapter_width": 6}},
                          shape, 10)
    # Host weights are drawn first, so the same seed gives the same host.
    missing, _ = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("adapters.") for k in missing)
    extra = sum(p.numel() for p in adapted.adapters.parameters())
    assert extra == (40 * 6 + 6 + 6 * 16 + 16) + (16 * 6 + 6 + 6 * 12 + 12)
    x = torch.randn(5, *shape)
    assert torch.equal(adapted(x), plain(x))  # zero last layers: function-preserving
    adapted(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.adapters[0][-1].parameters())
    # kasmina.wrap takes the host's layers; the adapters are not seeds.
    _, report = kasmina.wrap(copy.deepcopy(adapted), {"include": ["layers.*"]})
    assert [layer.path for layer in report.layers] == ["layers.0", "layers.1"]


def test_mlp_spans_start_as_the_plain_mlp_and_a_span_branch_is_a_wider_layer():
    shape, widths, k = (40,), [16, 12], 5
    torch.manual_seed(0)
    plain = build_model({"name": "mlp", "kwargs": {"widths": widths}}, shape, 10)
    torch.manual_seed(0)
    spanned = build_model({"name": "mlp", "kwargs": {"widths": widths, "spans": True}}, shape, 10)
    assert [(s.in_features, s.out_features) for s in spanned.spans] == [(40, 12), (16, 10)]
    x = torch.randn(6, *shape)
    assert torch.equal(spanned(x), plain(x))  # spans own no weights and add zeros

    class Branch(Span):  # what a graft on spans.0 computes: k new units between layers 0 and 1
        def __init__(self):
            super().__init__(40, 12)
            self.up, self.down = nn.Linear(40, k), nn.Linear(k, 12)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    spanned.spans[0] = branch = Branch()
    wide = build_model({"name": "mlp", "kwargs": {"widths": [16 + k, 12]}}, shape, 10)
    with torch.no_grad():
        wide.layers[0].weight.copy_(torch.cat([plain.layers[0].weight, branch.up.weight]))
        wide.layers[0].bias.copy_(torch.cat([plain.layers[0].bias, branch.up.bias]))
        wide.layers[1].weight.copy_(torch.cat([plain.layers[1].weight, branch.down.weight], dim=1))
        wide.layers[1].bias.copy_(plain.layers[1].bias + branch.down.bias)
        wide.head.load_state_dict(plain.head.state_dict())
    torch.testing.assert_close(spanned(x), wide(x))


def test_one_dimensional_cnn_uses_conv2d_with_row_kernels():
    model = build_model("cnn", (40,), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 3), (1, 3)]
    assert not any(isinstance(m, nn.Conv1d) for m in model.modules())
    assert model.fc.in_features == 32 * 10  # 40 -> 20 -> 10 positions


def test_same_seed_same_weights():
    def weights():
        torch.manual_seed(5)
        return build_model("transformer", (40,), 10).state_dict()

    first, second = weights(), weights()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_dormant_wrap_changes_no_bit(case):
    """Every Linear and Conv2d but the head becomes a KasminaLayer; with all seeds dormant the
    output and every host gradient are bit-identical to the unwrapped model's."""
    name, kwargs, shape = case
    torch.manual_seed(1)
    model = build_model({"name": name, "kwargs": kwargs}, shape, 10)
    reference = copy.deepcopy(model)
    hosts = [path for path, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and path != "head"]
    wrapped, report = kasmina.wrap(model, {"targets": ["linear", "conv2d"], "exclude": ["head"],
                                           "seeds_per_layer": 2})
    assert [layer.path for layer in report.layers] == hosts
    assert report.skipped == []
    assert sum(isinstance(m, kasmina.KasminaLayer) for m in wrapped.modules()) == len(hosts)
    kinds = {layer.kind.value for layer in report.layers}
    assert kinds == ({"linear", "conv2d"} if name == "cnn" else {"linear"})

    x = torch.randn(9, *shape)
    for train in (True, False):
        wrapped.train(train)
        reference.train(train)
        assert torch.equal(wrapped(x), reference(x))
    wrapped.train()
    reference.train()
    wrapped(x).square().sum().backward()
    reference(x).square().sum().backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for layer_path, param in _host_named_parameters(wrapped):
        assert torch.equal(param.grad, grads[layer_path]), layer_path


def _host_named_parameters(wrapped: nn.Module):
    """The wrapped model's host parameters under their unwrapped names (`x.host.weight` -> `x.weight`)."""
    hosts = {id(p) for p in kasmina.host_parameters(wrapped)}
    for name, param in wrapped.named_parameters():
        if id(param) in hosts:
            yield name.replace(".host.", "."), param


# --- build_model: names and import paths ----------------------------------------------------

def test_zoo_names():
    assert set(ZOO) == {"mlp", "mlp_narrow", "cnn", "transformer"}
    assert isinstance(build_model("cnn", (1, 8, 8), 10), SmallCNN)


@pytest.mark.parametrize(("spec", "message"), [
    ("resnet50", "field 'model.name': unknown model 'resnet50'"),
    ({"name": "mlp", "kwargs": {"depth": 3}}, "field 'model.kwargs.depth': unknown argument of model 'mlp'"),
    ({"name": "cnn", "kwargs": {"kernel_size": 2}}, "field 'model.kwargs.kernel_size': must be odd"),
    ({"name": "mlp", "kwargs": {"widths": [8, 0]}}, "field 'model.kwargs.widths.1'"),
    ({"name": "mlp", "kwargs": {"activation": "swish"}}, "field 'model.kwargs.activation'"),
    ({"name": "mlp", "kwargs": {"input_shape": [3]}}, "field 'model.kwargs.input_shape': model 'mlp' sets this itself"),
    ({"name": "mlp", "extra": 1}, "field 'model.extra': unknown field"),
    ("no_such_pkg.nets:Net", "field 'model.name': cannot import 'no_such_pkg.nets'"),
    ("torch.nn:NoSuchLayer", "field 'model.name': 'torch.nn:NoSuchLayer': module 'torch.nn' has no attribute"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(BadInputError) as info:
        build_model(spec, (2,), 2)
    assert message in str(info.value)


def test_transformer_patch_must_divide_the_length():
    with pytest.raises(BadInputError, match="field 'model.kwargs.patch': 3 does not divide the input length 40"):
        build_model({"name": "transformer", "kwargs": {"patch": 3}}, (40,), 10)
    with pytest.raises(BadInputError, match="field 'model.kwargs.heads'"):
        build_model({"name": "transformer", "kwargs": {"d_model": 30, "heads": 4}}, (40,), 10)


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn

        class ShapedNet(nn.Module):
            def __init__(self, input_shape, out_dim, hidden=16):
                super().__init__()
                self.body = nn.Linear(input_shape[0], hidden)
                self.head = nn.Linear(hidden, out_dim)

            def forward(self, x):
                return self.head(self.body(x).relu())

        def fixed_net(width=8):
            return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 2))

        def not_a_model():
            return "a string"

        class Zoo:
            tiny = staticmethod(lambda: nn.Linear(2, 2))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"


def test_import_path_model_gets_shape_when_it_asks(user_models):
    model = build_model({"name": f"{user_models}:ShapedNet", "kwargs": {"hidden": 12}}, (5,), 3)
    assert (model.body.in_features, model.body.out_features, model.head.out_features) == (5, 12, 3)
    assert model(torch.randn(4, 5)).shape == (4, 3)


def test_import_path_model_without_shape_arguments(user_models):
    model = build_model({"name": f"{user_models}:fixed_net", "kwargs": {"width": 4}}, (2,), 2)
    assert model[0].out_features == 4
    assert isinstance(build_model(f"{user_models}:Zoo.tiny", (2,), 2), nn.Linear)  # dotted attribute


def test_import_path_model_errors(user_models):
    with pytest.raises(BadInputError, match="field 'model.kwargs.depth': unknown argument of model"):
        build_model({"name": f"{user_models}:fixed_net", "kwargs": {"depth": 2}}, (2,), 2)
    with pytest.raises(BadInputError, match="field 'model.name': .* returned a str, not a torch.nn.Module"):
        build_model(f"{user_models}:not_a_model", (2,), 2)
    with pytest.raises(BadInputError, match="has no attribute 'Missing'"):
        build_model(f"{user_models}:Missing", (2,), 2)


def test_import_path_model_in_a_config(user_models, tmp_path):
    from esper.tolaria.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name: '{user_models}:ShapedNet', kwargs: {{hidden: 8}}}}\ndata: two_spirals\n")
    config = load_config(path)
    assert build_model(config.model, (2,), 2).body.out_features == 8
    path.write_text(f"model: {{name: '{user_models}:ShapedNet', kwargs: {{hiden: 8}}}}\ndata: two_spirals\n")
    with pytest.raises(BadInputError, match=r"run.yaml: .*field 'model.kwargs.hiden': unknown argument"):
        load_config(path)
