"""Kasmina's configuration: which modules become seed layers, how they are chunked, and the
lifecycle, grafting, seed-training and telemetry knobs. Strict pydantic: an unknown key or a
wrong type is an error naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from esper.contracts import describe_validation_error
from esper.errors import BadInputError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class TelemetryConfig(_Strict):
    """Per-chunk health statistics (DESIGN.md section 10).

    While every seed of a layer is dormant, the layer reads its output only every `every`-th
    training step, and then only `max_rows` rows of it, evenly strided: a full extra pass over a
    4096-wide bf16 output costs about 5% of the linear that produced it, the sampled one about
    `1 / (every * rows / max_rows)` of that. Statistics are means over the sampled elements, so
    they estimate the same quantities whatever the batch size. With a seed active, telemetry is
    fused into the blend pass and covers every row of every step.
    """

    enabled: bool = True
    every: PositiveInt = 16
    max_rows: PositiveInt | None = 1024
    dead_threshold: NonNegFloat = 1e-6


class GraftingConfig(_Strict):
    """The alpha ramp of GRAFTING (kasmina-migration-plan, phase 5).

    Every strategy moves alpha by `1 / ramp_length` per unit (a training step, or an epoch
    boundary) while its gate is open: `fixed_ramp` always; `performance_linked` while the
    observed task loss stays within `loss_tolerance` of its value at graft start (it steps back
    when the loss is worse); `drift_controlled` while the seed's share of its chunk's activation,
    `alpha * rms(g) / rms(out)`, is below `max_drift`; `grad_norm_gated` while the chunk's output
    gradient RMS is below `grad_gate` times its value at graft start.
    """

    ramp_unit: Literal["step", "epoch"] = "step"
    ramp_length: PositiveInt = 200
    loss_tolerance: NonNegFloat = 0.02
    max_drift: NonNegFloat = 0.5
    grad_gate: NonNegFloat = 2.0


class SeedTrainingConfig(_Strict):
    """TRAINING: the isolated objective of a seed and its readiness gate.

    `reconstruction` fits g(x) to the host's chunk output (HLD B.2). `gradient_match` fits g(x)
    to the negative loss gradient of the chunk's output (cf. TINY), rescaled to
    `gradient_match_scale` times the chunk's activation RMS. A seed signals readiness after
    `min_steps` steps with its loss EMA at most `ready_loss_ratio` times the EMA of its target's
    energy (the loss of a seed that outputs zero, as every graft does at first, on the same
    steps): 0.5 is half the target's variance explained. Per-sample loss gradients are noisy,
    so `gradient_match` seldom explains half; the growth benchmark uses 0.9 with it.
    """

    objective: Literal["reconstruction", "gradient_match"] = "reconstruction"
    min_steps: NonNegInt = 50
    ready_loss_ratio: NonNegFloat = 0.5
    gradient_match_scale: NonNegFloat = 0.1


class BlockSpec(_Strict):
    """A named block with a fixed interface: one tensor in, one out, chunked on the feature
    (linear: last) or channel (conv2d: dim 1) axis. Sizes left out are read from the block's own
    `in_features` / `out_features` (linear) or `in_channels` / `out_channels` (conv2d)."""

    kind: Literal["linear", "conv2d"]
    in_features: PositiveInt | None = None
    out_features: PositiveInt | None = None
    stride: PositiveInt = 1


class KasminaConfig(_Strict):
    """What `kasmina.wrap` turns into seed layers, and how those layers behave.

    Selection: modules of the `targets` types, narrowed to module paths matching `include` (if
    given) and not matching `exclude`; plus `blocks`, named blocks by path pattern. Patterns are
    globs on the dotted path (`blocks.*.mlp.fc1`), or regular expressions when prefixed `re:`.
    A pattern that matches no module it could select is an error (`wrap`); `targets: []` with
    no `blocks` wraps nothing: a run without seeds. Chunking: `seeds_per_layer` or `chunk_width`, exactly one.
    """

    targets: list[Literal["linear", "conv2d"]] = Field(default_factory=lambda: ["linear"])
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    blocks: dict[str, BlockSpec] = Field(default_factory=dict)
    seeds_per_layer: PositiveInt | None = 4
    chunk_width: PositiveInt | None = None
    stabilization_steps: NonNegInt = 100
    evaluation_epochs: NonNegInt = 1
    fine_tuning_epochs: NonNegInt = 1
    # FOSSILIZED seeds keep learning on the task loss with the host, as parts of the model now;
    # False (DESIGN.md section 10): frozen for good. The growth benchmark measured frozen grafts
    # costing 3-14 points of accuracy in a fixed budget (docs/growth.md).
    train_fossils: bool = False
    embargo_epochs: NonNegInt = 5
    cache_bytes: PositiveInt = 512 * 2**20
    load_workers: PositiveInt = 2
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    grafting: GraftingConfig = Field(default_factory=GraftingConfig)
    training: SeedTrainingConfig = Field(default_factory=SeedTrainingConfig)

    @model_validator(mode="before")
    @classmethod
    def _chunking_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("chunk_width") is not None and "seeds_per_layer" not in data:
            data = dict(data, seeds_per_layer=None)
        return data

    @model_validator(mode="after")
    def _one_chunking(self) -> Self:
        if (self.seeds_per_layer is None) == (self.chunk_width is None):
            raise ValueError("give exactly one of seeds_per_layer and chunk_width")
        return self

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, source: str = "") -> KasminaConfig:
        """Validate a plain mapping (a YAML section); BadInputError names the first bad field."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise BadInputError(describe_validation_error(e, "kasmina config", source)) from None

