"""Runtime messages between Tolaria, Kasmina and Tamiyo (HLD 8.1.2, F.4, H.5)."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from esper.contracts.assets import KernelArtifactId, Tag
from esper.contracts.base import (
    Contract,
    SeedId,
    Sha256Hex,
    Timestamp,
    VersionedContract,
    utcnow,
)
from esper.contracts.enums import (
    TERMINAL_STAGES,
    GraftingStrategy,
    KasminaCommandType,
    RunControlAction,
    SeedLifecycle,
)

NonNegInt = Annotated[int, Field(ge=0)]


class HardwareContext(Contract):
    device_type: Literal["cpu", "cuda", "mps", "xpu"]
    device_name: str = ""
    memory_available_gb: Annotated[float, Field(ge=0)]
    supports_quantization: bool = False


class HealthSignal(VersionedContract):
    """One layer's seed telemetry for one report interval: one message per layer, not per seed.

    Every per-seed list has one entry per seed of the layer, in chunk order.
    """

    run_id: str
    layer_id: NonNegInt
    layer_name: str
    epoch: NonNegInt
    step: NonNegInt
    lifecycle: list[SeedLifecycle]
    activation_mean: list[float]
    activation_variance: list[float]
    dead_ratio: list[Annotated[float, Field(ge=0, le=1)]]
    gradient_energy: list[float]
    is_ready_for_transition: list[bool]

    @model_validator(mode="after")
    def _one_entry_per_seed(self) -> Self:
        n = len(self.lifecycle)
        for name in ("activation_mean", "activation_variance", "dead_ratio", "gradient_energy",
                     "is_ready_for_transition"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} seeds")
        return self


class GuardReading(Contract):
    """The guarded task (Tolaria's `guard`): an earlier task the run must not forget (HLD 2.4.4).
    `metric` is its validation accuracy (read within its classes) or loss; `reference` was read
    at the run's start, `value` now with every graft. `without`: while `value` is worse than
    `reference`, the task with one seed disabled, for each graft that blends and is not yet
    fossilized."""

    metric: Literal["accuracy", "loss"]
    reference: float
    value: float
    without: dict[SeedId, float] = Field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def degradation(self, value: float | None = None) -> float:
        """How much worse than `reference` (relative; positive: worse) `value` (default: now) is."""
        value = self.value if value is None else value
        worse = self.reference - value if self.higher_is_better else value - self.reference
        return worse / max(abs(self.reference), 1e-12)

    def blamed(self, limit: float) -> list[SeedId]:
        """The fewest grafts whose removal makes up the excess over `limit`: while the task reads
        more than `limit` worse than `reference`, the grafts it reads better without, most
        recovered first, until their recoveries (each read alone) add up to what brings it back
        under `limit`; all of them if they never do. Empty within the limit."""
        if self.degradation() <= limit:
            return []
        sign = 1.0 if self.higher_is_better else -1.0
        allowed = self.reference - sign * limit * abs(self.reference)  # the limit's edge
        excess = sign * (allowed - self.value)
        recovery = sorted(((sign * (without - self.value), sid) for sid, without in self.without.items()),
                          key=lambda item: (-item[0], item[1]))
        chosen: list[SeedId] = []
        for recovered, sid in recovery:
            if recovered <= 0 or excess <= 0:
                break
            chosen.append(sid)
            excess -= recovered
        return chosen


class SystemStatePacket(VersionedContract):
    """Snapshot passed from Tolaria to Tamiyo at each epoch boundary. Seeds keyed `layer:index`."""

    run_id: str
    current_epoch: NonNegInt
    global_step: NonNegInt = 0
    train_loss: float | None = None
    validation_accuracy: float | None
    validation_loss: float
    hardware_context: HardwareContext
    health_map: dict[SeedId, dict[str, float]] = Field(default_factory=dict)
    seed_states: dict[SeedId, SeedLifecycle] = Field(default_factory=dict)
    guard: GuardReading | None = None


class KasminaControlCommand(VersionedContract):
    """Tamiyo's command to one seed, applied at the next epoch boundary (HLD F.4)."""

    command_id: str
    run_id: str
    target_layer_id: NonNegInt
    target_seed_id: NonNegInt
    command: KasminaCommandType
    kernel_artifact_id: KernelArtifactId | None = None
    target_stage: SeedLifecycle | None = None
    grafting_strategy: GraftingStrategy = GraftingStrategy.FIXED_RAMP
    selected_for_tags: list[Tag] | None = None
    reason: str = ""

    @model_validator(mode="after")
    def _arguments_match_command(self) -> Self:
        if self.command is KasminaCommandType.REQUEST_GERMINATION and self.kernel_artifact_id is None:
            raise ValueError("request_germination needs a kernel_artifact_id")
        if (self.command is KasminaCommandType.ADVANCE) != (self.target_stage is not None):
            raise ValueError("target_stage is given with, and only with, the advance command")
        return self


class AdaptationSignal(VersionedContract):
    """Tamiyo's answer to Tolaria at an epoch end, with the commands it issued."""

    optimizer_rebuild_required: bool
    emergency_rollback_required: bool
    rollback_reason: str | None = None
    commands: list[KasminaControlCommand] = Field(default_factory=list)


class FieldReport(VersionedContract):
    """The outcome of one adaptation, for Karn, Simic and Urabrask's risk model (HLD 8.1.2)."""

    report_id: str
    run_id: str
    blueprint_id: Sha256Hex
    kernel_artifact_id: KernelArtifactId
    seed_id: SeedId
    pre_metric: float
    post_metric: float
    outcome: SeedLifecycle
    reason: str = ""
    epoch: NonNegInt = 0
    eval_metrics: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _outcome_is_terminal(self) -> Self:
        if self.outcome not in TERMINAL_STAGES:
            raise ValueError(f"outcome must be a terminal stage, not {self.outcome.value}")
        return self


class SeedTransition(VersionedContract):
    """A seed moved between lifecycle stages (topic lifecycle.seed.transitions)."""

    run_id: str
    seed_id: SeedId
    epoch: NonNegInt
    from_stage: SeedLifecycle
    to_stage: SeedLifecycle
    kernel_artifact_id: KernelArtifactId | None = None
    reason: str = ""

    @model_validator(mode="after")
    def _legal(self) -> Self:
        if not self.from_stage.can_transition_to(self.to_stage):
            raise ValueError(f"illegal transition {self.from_stage.value} -> {self.to_stage.value}")
        return self


class TamiyoDecision(VersionedContract):
    """A controller decision and its explanation (topic control.tamiyo.decisions, HLD C.9)."""

    decision_id: str
    run_id: str
    epoch: NonNegInt
    action: Literal["germinate", "advance", "cull", "cancel", "rollback", "wait"]
    seed_id: SeedId | None = None
    kernel_artifact_id: KernelArtifactId | None = None
    policy: str = "heuristic"
    explanation: str
    scores: dict[str, float] = Field(default_factory=dict)


class EpochEvent(VersionedContract):
    """Tolaria's end-of-epoch heartbeat (topic system.events.epoch)."""

    run_id: str
    epoch: NonNegInt
    global_step: NonNegInt
    train_loss: float
    validation_loss: float
    validation_accuracy: float | None = None
    learning_rate: float | None = None
    active_seeds: NonNegInt = 0
    fossilized_seeds: NonNegInt = 0
    epoch_seconds: Annotated[float, Field(ge=0)] = 0.0
    epochs_planned: Annotated[int, Field(gt=0)] | None = None  # the run ends after this epoch


class RunControl(VersionedContract):
    """An operator's command to a training run (topic control.run)."""

    run_id: str
    action: RunControlAction
    reason: str = ""
    issued_at: Timestamp = Field(default_factory=utcnow)


class HealthSummaryReport(VersionedContract):
    """Compressed status from a sub-Tamiyo to Tamiyo-Prime (HLD H.5)."""

    domain_id: str
    avg_health_score: float
    net_volatility: float
    active_adaptations: NonNegInt
    atp_balance: int


class AllocationCommand(VersionedContract):
    """Tamiyo-Prime's budget for a sub-Tamiyo (HLD H.5)."""

    target_domain_id: str
    atp_budget_allocation: NonNegInt
    is_priority_agent: bool = False


class BlueprintSubmitted(VersionedContract):
    """A blueprint IR is in Urza and waits for the forge (topic compilation.blueprint.submitted)."""

    blueprint_id: Sha256Hex
    submitted_by: Literal["library", "human", "karn"]
    name: str = ""


class KernelReady(VersionedContract):
    """A new artifact waits for the bench (topic compilation.kernel.ready)."""

    kernel_artifact_id: KernelArtifactId
    blueprint_id: Sha256Hex
    pipeline: str
    target: str


class CompilationFailed(VersionedContract):
    """The forge could not use a blueprint (topic compilation.failed, HLD J.3.2, J.7).

    `stage` "validation": the IR failed the static check and the blueprint is now INVALID.
    `stage` "compile": one pipeline failed for one interface and target; the others stand.
    """

    blueprint_id: Sha256Hex
    stage: Literal["validation", "compile"]
    reason: str
    rule: str | None = None
    node: str | None = None
    pipeline: str | None = None
    interface: str | None = None
    target: str | None = None


class KernelCharacterized(VersionedContract):
    """Urabrask's verdict on a kernel (topic validation.kernel.characterized, HLD F.4)."""

    blueprint_id: Sha256Hex
    kernel_artifact_id: KernelArtifactId
    status: Literal["VALIDATED", "REJECTED"]
    tags: list[Tag] = Field(default_factory=list)
    latency_ms: float | None = None
    reason: str | None = None


class DaemonHeartbeat(VersionedContract):
    """A daemon's loop is alive (topic system.heartbeats): sent every `interval_s` while it
    waits for work and after each result it publishes; `esper watch` flags a daemon whose last
    beat is too old, unless that beat said it was stopping."""

    daemon: str = Field(min_length=1, max_length=100)  # the service: tezzeret, urabrask, karn
    worker_id: str = Field(min_length=1, max_length=200)
    host: str = ""
    pid: NonNegInt = 0
    state: Literal["idle", "busy", "stopping"]
    interval_s: Annotated[float, Field(gt=0)]
    uptime_s: Annotated[float, Field(ge=0)] = 0.0
    published: dict[str, NonNegInt] = Field(default_factory=dict)  # results sent, by topic


class NissaAlert(VersionedContract):
    """An alert rule of `esper watch` started firing (topic system.alerts)."""

    rule: Literal["rollback_rate", "certification_rate", "consumer_lag", "daemon_stalled",
                  "run_stalled"]
    subject: str = Field(min_length=1, max_length=300)  # the run, group or daemon it is about
    message: str
    value: float
    threshold: float
