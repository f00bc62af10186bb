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
from esper.contracts.envelope import TOPIC_PAYLOADS, Envelope, Topic, new_event_id
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

__all__ = [name for name in dir() if not name.startswith("_")]
