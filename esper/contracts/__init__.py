"""Esper's data contracts: strict, versioned pydantic models that travel as JSON (DESIGN.md section 4)."""

from esper.contracts.assets import (
    KERNEL_ID_PATTERN,
    LATENCY_MS,
    MEMORY_MB,
    Blueprint,
    CompilationPipeline,
    CompilationRecord,
    CompiledKernelArtifact,
    KernelInterface,
    KernelQuery,
    KernelQueryResult,
    UrabraskTagRefresh,
    UrabraskValidationReport,
)
from esper.contracts.base import (
    SCHEMA_VERSION,
    Contract,
    VersionedContract,
    describe_validation_error,
    seed_id,
    utcnow,
)
from esper.contracts.enums import (
    BLUEPRINT_TRANSITIONS,
    KERNEL_TRANSITIONS,
    LIFECYCLE_TRANSITIONS,
    TERMINAL_STAGES,
    BlueprintStatus,
    GraftingStrategy,
    KasminaCommandType,
    KernelStatus,
    LayerKind,
    RunControlAction,
    SeedLifecycle,
)
from esper.contracts.envelope import TOPIC_PAYLOADS, Envelope, Topic, new_event_id
from esper.contracts.operational import (
    AdaptationSignal,
    AllocationCommand,
    BlueprintSubmitted,
    CompilationFailed,
    DaemonHeartbeat,
    EpochEvent,
    FieldReport,
    GuardReading,
    HardwareContext,
    HealthSignal,
    HealthSummaryReport,
    KasminaControlCommand,
    KernelCharacterized,
    KernelReady,
    NissaAlert,
    RunControl,
    SeedTransition,
    SystemStatePacket,
    TamiyoDecision,
)

__all__ = [
    "BLUEPRINT_TRANSITIONS", "KERNEL_ID_PATTERN", "KERNEL_TRANSITIONS", "LATENCY_MS",
    "LIFECYCLE_TRANSITIONS", "MEMORY_MB", "SCHEMA_VERSION", "TERMINAL_STAGES", "TOPIC_PAYLOADS",
    "AdaptationSignal", "AllocationCommand", "Blueprint", "BlueprintStatus", "BlueprintSubmitted",
    "CompilationFailed", "CompilationPipeline", "CompilationRecord", "CompiledKernelArtifact",
    "Contract", "DaemonHeartbeat", "Envelope", "EpochEvent", "FieldReport", "GraftingStrategy",
    "GuardReading", "HardwareContext", "HealthSignal", "HealthSummaryReport", "KasminaCommandType",
    "KasminaControlCommand", "KernelCharacterized", "KernelInterface", "KernelQuery",
    "KernelQueryResult", "KernelReady", "KernelStatus", "LayerKind", "NissaAlert", "RunControl",
    "RunControlAction", "SeedLifecycle", "SeedTransition", "SystemStatePacket", "TamiyoDecision",
    "Topic", "UrabraskTagRefresh", "UrabraskValidationReport", "VersionedContract",
    "describe_validation_error", "new_event_id", "seed_id", "utcnow",
]
