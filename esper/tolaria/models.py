"""The built-in model zoo, and `build_model` for zoo names and `package.module:Attr` paths.

    model = build_model(config.model, data.input_shape, data.out_dim)

Every zoo model is made of nn.Linear and nn.Conv2d layers that `kasmina.wrap` can take
(convolutions have odd kernels, 'same' padding and stride 1), and calls its last layer `head`:
its width is the number of classes, which seldom splits into seeds, so configs usually say
`kasmina: {exclude: [head]}`.
"""

from __future__ import annotations

import fnmatch
import inspect
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field, ValidationError
from torch import nn

from esper.errors import BadInputError, EsperError
from esper.tolaria.config import (
    ModelConfig,
    check_component,
    describe_problems,
    resolve_component,
    validation_problems,
)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Activation = Literal["relu", "gelu", "tanh"]


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("must be odd (a 'same' convolution that kasmina.wrap can take)")
    return value


OddInt = Annotated[int, Field(gt=0), AfterValidator(_odd)]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Flatten, then `widths` hidden Linear layers (`layers.0`, `layers.1`, ...) and a `head`.

    `adapter_width > 0` gives every hidden layer a static parallel adapter from the start:
    `layers.i(x) + adapters.i(x)`, where an adapter is `x -> adapter_width units -> the layer's
    width` with its last layer zero (the model starts as the plain MLP). It is what a grafted
    seed adds to one chunk (DESIGN.md section 7), placed everywhere at once: the growth
    benchmark's PEFT-style arm at a matched parameter budget.

    `spans=True` adds `spans.i` after every hidden layer: a `Span` that reads the input of
    `layers.i` and adds into the pre-activation of the next layer (or `head`). It outputs zeros,
    so the model computes what it did without it; a seed on a span (`kasmina.blocks:
    {"spans.*": {kind: linear}}`) is a graft that widens hidden layer i: new units that read the
    layer's input and feed the next layer, as gromo's and TINY's growth add them.
    """

    def __init__(self, input_shape: Sequence[int], out_dim: int, widths: Sequence[PositiveInt] = (64, 64),
                 activation: Activation = "relu", dropout: Fraction = 0.0,
                 adapter_width: NonNegInt = 0, spans: bool = False) -> None:
        super().__init__()
        sizes = [math.prod(input_shape), *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.adapters = nn.ModuleList(
            _adapter(a, adapter_width, b, activation) for a, b in itertools.pairwise(sizes)
        ) if adapter_width else None
        self.head = nn.Linear(sizes[-1], out_dim)
        # span i: the input of layers.i -> the pre-activation of the layer after it
        self.spans = nn.ModuleList(
            Span(a, b) for a, b in zip(sizes[:-1], [*sizes[2:], out_dim])
        ) if spans else None
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        act = _ACTIVATIONS[self.activation]
        widened = None  # what span i-1 adds to layer i's pre-activation
        for i, layer in enumerate(self.layers):
            h = layer(x)
            if self.adapters is not None:
                h = h + self.adapters[i](x)
            if widened is not None:
                h = h + widened
            widened = self.spans[i](x) if self.spans is not None else None
            x = self.dropout(act(h))
        out = self.head(x)
        return out if widened is None else out + widened


class Span(nn.Module):
    """The host side of a widening seed: reads a layer's input (`in_features`), outputs zeros of
    the next layer's pre-activation width (`out_features`). Wrapped by Kasmina as a linear
    block, its grafts are new hidden units between the two layers."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _adapter(in_features: int, width: int, out_features: int, activation: Activation) -> nn.Sequential:
    branch = nn.Sequential(nn.Linear(in_features, width), _MODULES[activation](),
                           nn.Linear(width, out_features))
    nn.init.zeros_(branch[-1].weight)
    nn.init.zeros_(branch[-1].bias)
    return branch


def mlp_narrow(input_shape: Sequence[int], out_dim: int, width: PositiveInt = 8,
               activation: Activation = "relu") -> MLP:
    """One hidden layer of `width` units, too narrow for the task on purpose: the starting point
    of the growth benchmark (GradMax-style), where capacity has to come from grafted seeds."""
    return MLP(input_shape, out_dim, widths=(width,), activation=activation)


class SmallCNN(nn.Module):
    """Convolution stages (`convs.0`, ...; conv, activation, 2x max-pool while the size allows),
    then a hidden Linear `fc` and the `head`.

    Input (length,) is a 1-D signal such as MNIST-1D's 40 samples: it runs as a (1, 1, length)
    image through (1, k) kernels, since Kasmina seeds plug into nn.Conv2d, not nn.Conv1d.
    Input (height, width) is a one-channel image (digits: 8x8); (channels, height, width) as is.
    """

    def __init__(self, input_shape: Sequence[int], out_dim: int, channels: Sequence[PositiveInt] = (16, 32),
                 kernel_size: OddInt = 3, hidden: PositiveInt = 64, activation: Activation = "relu") -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 1:
            self.image_shape = (1, 1, shape[0])
            kernel, pool = (1, kernel_size), (1, 2)
        elif len(shape) in (2, 3):
            self.image_shape = (1, *shape) if len(shape) == 2 else shape
            kernel, pool = (kernel_size, kernel_size), (2, 2)
        else:
            raise BadInputError(f"model 'cnn': input shape {shape} is not (length,), (height, width) "
                                "or (channels, height, width)")
        in_channels, height, width = self.image_shape
        self.convs = nn.ModuleList()
        self.pools = nn.ModuleList()
        for out_channels in channels:
            self.convs.append(nn.Conv2d(in_channels, out_channels, kernel,
                                        padding=(kernel[0] // 2, kernel[1] // 2)))
            # pool an axis only while it has 2 or more positions left
            step = (pool[0] if height >= 2 else 1, pool[1] if width >= 2 else 1)
            self.pools.append(nn.MaxPool2d(step) if step != (1, 1) else nn.Identity())
            in_channels, height, width = out_channels, height // step[0], width // step[1]
        self.fc = nn.Linear(in_channels * height * width, hidden)
        self.head = nn.Linear(hidden, out_dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], *self.image_shape)  # (batch, channels, height, width)
        for conv, pool in zip(self.convs, self.pools):
            x = pool(act(conv(x)))
        return self.head(act(self.fc(x.flatten(1))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with its four projections as plain nn.Linear (`q`, `k`, `v`,
    `o`), so that Kasmina can wrap each; nn.MultiheadAttention reads `out_proj.weight` directly
    and would break once its projection is wrapped."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, d_model = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, head_dim)
            return t.view(batch, tokens, self.heads, d_model // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(batch, tokens, d_model))


class EncoderBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ff(norm(x)) with ff = `up`, GELU, `down`."""

    def __init__(self, d_model: int, heads: int, ff_width: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, ff_width)
        self.down = nn.Linear(ff_width, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))


class TransformerClassifier(nn.Module):
    """A small encoder: tokens, a Linear `embed`, learned positions, `depth` blocks, a final
    norm, mean over tokens, `head`.

    Tokens: input (length,) is cut into patches of `patch` samples (MNIST-1D: 10 tokens of 4);
    (tokens, features) is used as is; (channels, height, width) makes one token per row.
    """

    def __init__(self, input_shape: Sequence[int], out_dim: int, d_model: PositiveInt = 32,
                 heads: PositiveInt = 4, depth: PositiveInt = 2, ff_mult: PositiveInt = 2,
                 patch: PositiveInt = 4, dropout: Fraction = 0.0) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 1:
            if shape[0] % patch:
                raise BadInputError(f"field 'model.kwargs.patch': {patch} does not divide the "
                                    f"input length {shape[0]}")
            tokens, token_dim = shape[0] // patch, patch
        elif len(shape) == 2:
            tokens, token_dim = shape
        elif len(shape) == 3:
            tokens, token_dim = shape[1], shape[0] * shape[2]
        else:
            raise BadInputError(f"model 'transformer': input shape {shape} is not (length,), "
                                "(tokens, features) or (channels, height, width)")
        if d_model % heads:
            raise BadInputError(f"field 'model.kwargs.heads': {heads} heads do not divide "
                                f"d_model {d_model}")
        self.input_rank = len(shape)
        self.tokens, self.token_dim = tokens, token_dim
        self.embed = nn.Linear(token_dim, d_model)
        self.position = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, heads, ff_mult * d_model, dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rank == 3:
            x = x.permute(0, 2, 1, 3)  # (batch, height, channels, width): one token per row
        x = x.reshape(x.shape[0], self.tokens, self.token_dim)  # (batch, tokens, token_dim)
        x = self.embed(x) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


# Zoo name -> class or factory, each called as f(input_shape, out_dim, **kwargs).
ZOO: dict[str, Any] = {
    "mlp": MLP,
    "mlp_narrow": mlp_narrow,
    "cnn": SmallCNN,
    "transformer": TransformerClassifier,
}

# What build_model passes itself, to a zoo model always, to an imported one when it names them.
SUPPLIED = ("input_shape", "out_dim")


def resolve_model(name: str) -> Any:
    """The class or factory a zoo name or import path names."""
    return resolve_component(name, ZOO, "model")


def check_model_config(spec: ModelConfig) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems with the model section, located under it (('kwargs', 'widths', 0), message):
    a name that does not resolve, kwargs the builder does not take or (zoo) of the wrong type."""
    return check_component(spec.name, spec.kwargs, ZOO, SUPPLIED, "model")


def build_model(spec: ModelConfig | Mapping[str, Any] | str, input_shape: Sequence[int],
                out_dim: int) -> nn.Module:
    """Build the host model: a zoo model, or `package.module:Attr(**kwargs)` with `input_shape`
    and `out_dim` passed when its signature names them. Initialisation draws from torch's global
    RNG: seed it first for a reproducible model."""
    if not isinstance(spec, ModelConfig):
        try:
            spec = ModelConfig.model_validate(spec)
        except ValidationError as e:
            problems = [(("model", *loc), msg) for loc, msg in validation_problems(e)]
            raise BadInputError(describe_problems(problems)) from None
    problems = check_model_config(spec)
    if problems:
        raise BadInputError(describe_problems([(("model", *loc), msg) for loc, msg in problems]))
    builder = resolve_model(spec.name)
    given = {"input_shape": tuple(int(n) for n in input_shape), "out_dim": int(out_dim)}
    if spec.name not in ZOO:
        accepted = _parameter_names(builder)
        given = {k: v for k, v in given.items() if k in accepted}
    try:
        model = builder(**given, **spec.kwargs)
    except Exception as e:  # noqa: BLE001 - the user's constructor: any error is the model's
        raise BadInputError(f"field 'model.name': building {spec.name!r} raised "
                            f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise BadInputError(f"field 'model.name': {spec.name!r} returned a {type(model).__name__}, "
                            "not a torch.nn.Module")
    return model


def init_host(host: nn.Module, path: str | os.PathLike[str]) -> None:
    """Copy the host weights of the model saved at `path` (`model.init_from`) into `host`.

    The saved model must be a host without grafts (its seeds, if it was wrapped, all dormant):
    a graft's weights only mean something inside the seed that holds it, which `--resume` and
    `esper.load_model` restore. Parameters of `host` that the saved one lacks keep their
    initialisation."""
    import kasmina
    from esper.tolaria.export import load_model
    from kasmina.lifecycle import HAS_KERNEL

    where = f"field 'model.init_from': {path}"
    try:
        saved = load_model(path)
    except EsperError as e:  # missing, not a saved model, or damaged: say which setting named it
        raise type(e)(f"field 'model.init_from': {e}") from None
    grafted = sum(layer.stage(seed) in HAS_KERNEL for layer in kasmina.layers(saved)
                  for seed in range(layer.seeds))
    if grafted:
        raise BadInputError(f"{where}: the saved model has {grafted} grafted seed(s); "
                            "init_from takes a host's weights (load the whole model with "
                            "esper.load_model)")
    wrapped = {name + "." for name, module in saved.named_modules() if isinstance(module, kasmina.KasminaLayer)}
    weights = {}
    for key, value in saved.state_dict().items():
        layer = next((prefix for prefix in wrapped if key.startswith(prefix)), None)
        if layer is None:
            weights[key] = value
        elif key.startswith(layer + "host."):
            weights[layer + key[len(layer) + len("host."):]] = value
    try:
        result = host.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise BadInputError(f"{where}: the saved host does not fit this model: {first}") from None
    if result.unexpected_keys:
        raise BadInputError(f"{where}: the saved host has weights this model lacks: "
                            f"{', '.join(result.unexpected_keys[:5])}")


def freeze_host(host: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Stop the parameters of `host` whose names match a glob of `patterns` (`model.freeze`)
    from training; the names frozen. A pattern that matches nothing is an error."""
    names = [name for name, _ in host.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise BadInputError(f"field 'model.freeze': {pattern!r} matches no parameter of the "
                                f"host (it has {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    frozen = []
    for name, param in host.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _parameter_names(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
