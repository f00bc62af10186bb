"""The op whitelist: every op a blueprint may use, what it reads, and which attributes it takes.

This table is the single source of truth for the validator (arity, edge typing, attributes) and
the builder (which keeps its own op -> module factory table and a test holds the two equal).

Tensor kinds (the type of an edge): a blueprint on a `linear` host carries *features*,
`(..., C)`; on a `conv2d` host it carries *feature maps*, `(B, C, H, W)`. No op converts one
kind into the other, so every edge of a blueprint has its host's kind, and an op that cannot
consume that kind (a convolution on features, a layer norm on feature maps) is an edge-type
error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from esper.contracts.enums import LayerKind

FEATURES = LayerKind.LINEAR
FEATURE_MAPS = LayerKind.CONV2D
BOTH = frozenset({FEATURES, FEATURE_MAPS})

# Widths and strides are bounded so that arithmetic on them stays small and exact; the budgets
# (parameters, FLOPs) are what really limits a blueprint's size.
MAX_WIDTH = 1 << 16
MAX_STRIDE = 8
MAX_FACTOR = 64


class AttrKind(str, Enum):
    """How an attribute's value is checked."""

    WIDTH = "width"  # a positive int, "in", "out" or {"mult_of": "in"|"out", "factor": F}
    STRIDE = "stride"  # an int in 1..MAX_STRIDE or "interface"
    BOOL = "bool"
    PROBABILITY = "probability"  # a number in [0, 1)
    NUMBER = "number"  # any finite number


@dataclass(frozen=True)
class AttrSpec:
    kind: AttrKind
    required: bool = False
    default: object = None


@dataclass(frozen=True)
class OpSpec:
    """One whitelisted op.

    `zero_init`: the builder can zero this op's last parameters so that its output is exactly
    zero for any input; only such an op may feed a blueprint's output.
    `has_bias`: the op carries a per-channel bias when its `bias` attribute is true.
    """

    name: str
    arity: int
    consumes: frozenset[LayerKind]
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    zero_init: bool = False
    has_bias: bool = False
    doc: str = ""


def _width(required: bool = True, default: object = None) -> AttrSpec:
    return AttrSpec(AttrKind.WIDTH, required=required, default=default)


_BIAS = AttrSpec(AttrKind.BOOL, default=True)
_STRIDE = AttrSpec(AttrKind.STRIDE, default=1)

_SPECS = [
    OpSpec("input", 0, BOTH, doc="the host module's input; exactly one per blueprint"),
    OpSpec("output", 1, BOTH, doc="the blueprint's result; exactly one, it feeds nothing"),
    OpSpec("linear", 1, frozenset({FEATURES}), {"out": _width(), "bias": _BIAS},
           zero_init=True, has_bias=True, doc="y = x W^T + b over the last dimension"),
    OpSpec("low_rank", 1, frozenset({FEATURES}),
           {"rank": _width(), "out": _width(), "bias": _BIAS}, zero_init=True, has_bias=True,
           doc="y = B (A x) + b with A rank-by-in (no bias) and B out-by-rank; B and b start at zero "
               "when it feeds the output"),
    OpSpec("conv1x1", 1, frozenset({FEATURE_MAPS}),
           {"out": _width(), "stride": _STRIDE, "bias": _BIAS}, zero_init=True, has_bias=True,
           doc="pointwise convolution"),
    OpSpec("conv3x3", 1, frozenset({FEATURE_MAPS}),
           {"out": _width(), "stride": _STRIDE, "bias": _BIAS}, zero_init=True, has_bias=True,
           doc="3x3 convolution, padding 1: spatial size ceil(H/stride)"),
    OpSpec("depthwise_conv3x3", 1, frozenset({FEATURE_MAPS}), {"stride": _STRIDE, "bias": _BIAS},
           zero_init=True, has_bias=True, doc="3x3 per-channel convolution, padding 1"),
    OpSpec("layer_norm", 1, frozenset({FEATURES}), doc="LayerNorm over the last dimension"),
    OpSpec("rms_norm", 1, frozenset({FEATURES}), doc="RMSNorm over the last dimension"),
    OpSpec("batch_norm", 1, frozenset({FEATURE_MAPS}), doc="BatchNorm2d over channels"),
    OpSpec("relu", 1, BOTH),
    OpSpec("gelu", 1, BOTH),
    OpSpec("silu", 1, BOTH),
    OpSpec("tanh", 1, BOTH),
    OpSpec("sigmoid", 1, BOTH),
    OpSpec("mul", 2, BOTH, doc="elementwise product of two equal-shaped inputs (gating)"),
    OpSpec("add", 2, BOTH, doc="elementwise sum of two equal-shaped inputs (residual)"),
    OpSpec("attention_head", 1, frozenset({FEATURES}),
           {"dim": _width(), "causal": AttrSpec(AttrKind.BOOL, default=False)},
           doc="single-head self-attention over dim -2 of a (..., T, C) input: the host must "
               "feed sequences (at least 3 dims); output (..., T, dim)"),
    OpSpec("dropout", 1, BOTH, {"p": AttrSpec(AttrKind.PROBABILITY, required=True)}),
    OpSpec("scale", 1, BOTH, {"init": AttrSpec(AttrKind.NUMBER, default=1.0)}, zero_init=True,
           doc="a learned per-channel gain starting at `init` (at zero when it feeds the output)"),
]

OPS: dict[str, OpSpec] = {spec.name: spec for spec in _SPECS}
ACTIVATIONS = frozenset({"relu", "gelu", "silu", "tanh", "sigmoid"})
