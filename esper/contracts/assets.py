"""Urza's assets: blueprints, compiled kernel artifacts, validation reports, kernel queries (HLD 8.1)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from esper.contracts.base import (
    Contract,
    Sha256Hex,
    Timestamp,
    VersionedContract,
    utcnow,
)
from esper.contracts.enums import BlueprintStatus, KernelStatus, LayerKind
from esper.errors import BadInputError

# `<ir-hash[:12]>-<target>-<pipeline>-<config-hash[:6]>` (HLD J.5). The last part hashes the
# toolchain and the key build parameters (interface, dtype), so each variant has its own id.
KERNEL_ID_PATTERN = r"^[0-9a-f]{12}-[a-z0-9_]+-(fast|standard|aggressive)-[0-9a-f]{6}$"
KernelArtifactId = Annotated[str, Field(pattern=KERNEL_ID_PATTERN)]
DeviceTarget = Annotated[str, Field(pattern=r"^[a-z0-9_]+$", max_length=32)]
Tag = Annotated[str, Field(pattern=r"^[a-z0-9_]+$", max_length=64)]
# An interface's widths and stride: positive, and within what the catalog stores (SQLite's int64
# would take more; no layer comes near).
MAX_WIDTH = 2**31 - 1
Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
PositiveInt = Annotated[int, Field(gt=0)]

# Keys of UrabraskValidationReport.benchmark_results that the KernelQuery filters and ranks by.
LATENCY_MS = "latency_ms_mean"
MEMORY_MB = "memory_mb_peak"
PARAM_COUNT = "param_count"


class CompilationPipeline(str, Enum):
    FAST = "fast"
    STANDARD = "standard"
    AGGRESSIVE = "aggressive"


class KernelInterface(Contract):
    """What a kernel plugs into: `linear:IN:OUT` or `conv2d:IN:OUT:STRIDE`.

    For a seed, IN is the host module's input width and OUT the width of the seed's chunk.
    """

    kind: LayerKind
    in_features: Width
    out_features: Width
    stride: Width = 1

    @model_validator(mode="after")
    def _linear_has_no_stride(self) -> Self:
        if self.kind is LayerKind.LINEAR and self.stride != 1:
            raise ValueError("a linear interface has no stride")
        return self

    def __str__(self) -> str:
        if self.kind is LayerKind.CONV2D:
            return f"conv2d:{self.in_features}:{self.out_features}:{self.stride}"
        return f"linear:{self.in_features}:{self.out_features}"

    @classmethod
    def parse(cls, text: str) -> KernelInterface:
        """Parse `linear:IN:OUT` or `conv2d:IN:OUT[:STRIDE]`."""
        parts = text.strip().split(":")
        try:
            kind = LayerKind(parts[0])
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            numbers = []
            kind = None
        expected = {LayerKind.LINEAR: (2,), LayerKind.CONV2D: (2, 3)}
        if (kind is None or len(numbers) not in expected[kind] or min(numbers, default=0) <= 0
                or max(numbers) > MAX_WIDTH):
            raise BadInputError(
                f"bad interface {text!r}: expected linear:IN:OUT or conv2d:IN:OUT[:STRIDE] "
                f"with positive integers up to {MAX_WIDTH}"
            )
        return cls(kind=kind, in_features=numbers[0], out_features=numbers[1],
                   stride=numbers[2] if len(numbers) == 3 else 1)


class CompilationRecord(Contract):
    """How one artifact was built (HLD 8.1.1, compilation metadata schema)."""

    pipeline: CompilationPipeline
    compilation_seconds: Annotated[float, Field(ge=0)]
    peak_memory_gb: Annotated[float, Field(ge=0)]
    toolchain_version: str
    optimization_flags: list[str] = Field(default_factory=list)


class UrabraskValidationReport(VersionedContract):
    """Urabrask's signed evaluation of one kernel (HLD 8.1.1, Appendix E.3)."""

    kernel_artifact_id: KernelArtifactId
    blueprint_id: Sha256Hex
    passed_validation: bool
    rejection_reason: str | None = None
    benchmark_results: dict[str, float] = Field(description="latency_ms_mean, memory_mb_peak, ...")
    generated_tags: list[Tag] = Field(default_factory=list)
    baseline_comparison: dict[str, float] = Field(default_factory=dict)
    hardware_context: dict[str, str] = Field(default_factory=dict)
    risk_score: Annotated[float, Field(ge=0, le=1)] | None = None
    conf_level: Literal["High", "Moderate", "Speculative"] | None = None
    urabrask_interest: Annotated[float, Field(ge=0)] | None = None
    report_timestamp: Timestamp = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _rejection_has_reason(self) -> Self:
        if not self.passed_validation and not self.rejection_reason:
            raise ValueError("a failed validation needs a rejection_reason")
        return self


class UrabraskTagRefresh(VersionedContract):
    """Urabrask's signed re-tagging of VALIDATED kernels as their target's population grows
    (HLD E.3.2: tags are percentiles of the population, so they move with it). `tags` holds the
    complete new tag set of each kernel listed; kernels not listed keep theirs."""

    target: DeviceTarget
    tags: dict[KernelArtifactId, list[Tag]] = Field(min_length=1)
    population: Annotated[int, Field(ge=0)]
    policy: Literal["percentile", "fixed_thresholds"]
    report_timestamp: Timestamp = Field(default_factory=utcnow)


class CompiledKernelArtifact(VersionedContract):
    """One compiled variant of a blueprint, for one interface, target, dtype and pipeline."""

    id: KernelArtifactId
    blueprint_id: Sha256Hex
    status: KernelStatus = KernelStatus.PENDING_BENCHMARKING
    compilation_pipeline: CompilationPipeline
    interface: KernelInterface
    target: DeviceTarget
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    toolchain_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{6,64}$")]
    kernel_binary_ref: Sha256Hex = Field(description="blob hash of the signed manifest")
    compilation: CompilationRecord | None = None
    tags: list[Tag] = Field(default_factory=list)
    validation_report: UrabraskValidationReport | None = None
    status_reason: str | None = None
    created_at: Timestamp = Field(default_factory=utcnow)


class Blueprint(VersionedContract):
    """A blueprint design and its portfolio of compiled artifacts (HLD 8.1.1)."""

    id: Sha256Hex = Field(description="sha256 of the canonical IR JSON")
    name: str
    status: BlueprintStatus = BlueprintStatus.UNVALIDATED
    architecture_ref: Sha256Hex = Field(description="blob hash of the IR JSON")
    interface_kind: LayerKind
    origin: Literal["library", "human", "karn"] = "human"
    parent_ids: list[Sha256Hex] = Field(default_factory=list)
    status_reason: str | None = None
    tamiyo_interest: Annotated[float, Field(ge=0)] = 0.0
    metadata: dict[str, Any] = Field(default_factory=dict)
    compiled_artifacts: dict[str, CompiledKernelArtifact] = Field(default_factory=dict)
    created_at: Timestamp = Field(default_factory=utcnow)


class KernelQuery(VersionedContract):
    """Tamiyo's question to Urza: which VALIDATED kernels fit this seed? (HLD 8.1.2)

    Only VALIDATED kernels are ever returned. Results are ranked by the number of preferred
    tags they carry (more first), then by measured latency (lower first).
    """

    blueprint_id: Sha256Hex | None = None
    interface: KernelInterface | None = None
    target: DeviceTarget | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    pipeline: CompilationPipeline | None = None
    required_tags: list[Tag] = Field(default_factory=list)
    preferred_tags: list[Tag] = Field(default_factory=list)
    excluded_tags: list[Tag] = Field(default_factory=list)
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    max_memory_mb: Annotated[float, Field(gt=0)] | None = None
    limit: Annotated[int, Field(gt=0, le=10_000)] = 50


class KernelQueryResult(VersionedContract):
    matching_kernels: list[CompiledKernelArtifact]
