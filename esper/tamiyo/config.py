"""Tamiyo's configuration: when to grow, where, with which kernel, and when to stop a graft.

Strict pydantic like every config section: an unknown key or a wrong type is an error that names
the field (`TamiyoConfig.from_mapping(data, source="run.yaml")`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esper.contracts import GraftingStrategy, describe_validation_error
from esper.errors import BadInputError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class PlateauConfig(_Strict):
    """A plateau: `patience` epochs in a row without the monitored metric improving on its best
    by more than `min_delta` plus `min_delta_relative` times the best's magnitude (a scale-free
    threshold: 0.02 asks for 2% an epoch), or, with `slowdown`, by less than `slowdown` times the
    largest gain of any epoch of the run (0.25: learning at a quarter of its best pace). Nothing
    germinates before `warmup_epochs` epochs."""

    metric: Literal["validation_loss", "validation_accuracy", "train_loss"] = "validation_loss"
    patience: PositiveInt = 3
    min_delta: NonNegFloat = 1e-3
    min_delta_relative: NonNegFloat = 0.0
    slowdown: Annotated[float, Field(ge=0, lt=1)] = 0.0
    warmup_epochs: NonNegInt = 2


class LocationConfig(_Strict):
    """Where to grow: the dormant, non-embargoed seed with the strongest bottleneck score, a
    weighted sum of its chunk's health statistics, each ranked across candidate seeds first.

    `strategy: random` is the control arm of the growth benchmark: a free seed drawn uniformly,
    from a generator seeded by (`random_seed`, germinations so far), so a run and its resume
    draw the same seeds. Everything else (when to grow, which kernel, the gates) is unchanged.

    `spread: true` prefers a seed in the layer that holds the fewest grafts (germinated to
    fossilized), and ranks by bottleneck score among those: the ranking alone put both of a
    run's grafts in one layer in 11 of 12 growth-benchmark runs (docs/growth.md)."""

    strategy: Literal["bottleneck", "random"] = "bottleneck"
    spread: bool = False
    random_seed: NonNegInt = 0
    gradient_energy_weight: NonNegFloat = 1.0
    variance_weight: NonNegFloat = 0.5
    dead_ratio_weight: NonNegFloat = 0.5


class KernelChoiceConfig(_Strict):
    """Which kernel: the best VALIDATED `KernelQuery` result for the seed's interface and device,
    preferring `prefer_tags`, never above `max_risk` or `max_parameters`.

    Among kernels with as many preferred tags, `rank: capacity` takes the one with the most
    parameters (ties: lower latency), `rank: latency` the fastest. Germination answers a plateau,
    which is underfitting, so capacity is the default: on the growth benchmark the fastest
    kernels were the smallest (a rank-4 branch) and closed none of the gap
    (docs/growth-results.md). `max_parameters` caps one graft's size."""

    prefer_tags: list[str] = Field(default_factory=list)
    require_tags: list[str] = Field(default_factory=list)
    max_risk: Fraction = 0.7
    rank: Literal["capacity", "latency"] = "capacity"
    max_parameters: PositiveInt | None = None
    # strict=False: a YAML string names the enum member.
    grafting_strategy: Annotated[GraftingStrategy, Field(strict=False)] = GraftingStrategy.FIXED_RAMP


class GateConfig(_Strict):
    """Lifecycle gates. After EVALUATING a graft is kept (FINE_TUNING, then FOSSILIZED) when the
    monitored metric improved on its value at germination by at least `keep_min_improvement`;
    it is CULLED when it worsened by more than `cull_max_degradation`, or when it sits in
    TRAINING longer than `max_training_epochs` without signalling readiness.

    Between the two thresholds the evaluation is inconclusive: it is repeated, and culled after
    `max_evaluation_epochs`. After FINE_TUNING a graft is fossilized unless the metric is then
    worse than at germination by more than `cull_max_degradation`. A kernel not loaded within
    `max_loading_epochs` is cancelled; a graft whose alpha ramp has not completed after
    `max_grafting_epochs` (None: no limit; the ramp length is in steps) is culled.

    With a guarded task (Tolaria's `guard`: an earlier task the run must not forget), grafts
    that blend and are not yet fossilized are culled at any epoch end where the guarded metric is
    worse than at the run's start by more than `guard_max_degradation` (relative): the fewest of
    those it reads better without, most to blame first, whose recoveries make up the excess
    (`GuardReading.blamed`). The next epoch end reads the task again."""

    keep_min_improvement: float = 0.0
    cull_max_degradation: NonNegFloat = 0.0
    max_training_epochs: PositiveInt = 10
    max_evaluation_epochs: PositiveInt = 3
    max_loading_epochs: PositiveInt = 5
    max_grafting_epochs: PositiveInt | None = None
    guard_max_degradation: NonNegFloat = 0.05


class DivergenceConfig(_Strict):
    """Emergency rollback: a non-finite loss, or the validation loss above `loss_ratio` times
    the best seen so far while the training loss (where the packet has one) is also above
    `loss_ratio` times its own best. A model that diverges gets worse on the data it trains on;
    one that over-fits does not, and near zero its validation loss can triple from one epoch to
    the next (a digits run read 0.024, then 0.085, at 0.97-0.99 accuracy)."""

    loss_ratio: Annotated[float, Field(gt=1)] = 3.0


class TamiyoConfig(_Strict):
    """The controller (DESIGN.md section 11).

    At most `max_concurrent` adaptations are under way at once and `max_germinations` are
    started in the whole run (None: no limit); after an adaptation ends, the next germination
    waits `cooldown_epochs` epochs.

    `max_added_parameters` is the run's growth budget (None: no limit): the grafts it holds
    (the adaptations Tamiyo started that are under way, and the fossilized ones) never have
    more parameters than that in all. A germination takes only kernels whose measured parameter
    count fits what is left, so with `kernel.rank: capacity` the largest that fits; a kernel
    with no measured count does not fit. A graft CULLED, CANCELLED or ROLLED_BACK, or a
    germination Kasmina refused, gives its parameters back. `kernel.max_parameters` caps one
    graft."""

    policy: Literal["heuristic", "gnn"] = "heuristic"
    max_concurrent: PositiveInt = 1
    max_germinations: NonNegInt | None = None
    max_added_parameters: PositiveInt | None = None
    cooldown_epochs: NonNegInt = 0
    plateau: PlateauConfig = Field(default_factory=PlateauConfig)
    location: LocationConfig = Field(default_factory=LocationConfig)
    kernel: KernelChoiceConfig = Field(default_factory=KernelChoiceConfig)
    gates: GateConfig = Field(default_factory=GateConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, source: str = "") -> TamiyoConfig:
        """Validate a plain mapping (a YAML section); BadInputError names the first bad field."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise BadInputError(describe_validation_error(e, "tamiyo config", source)) from None
