"""Bus topics and the Envelope: "fat envelope, thin payload" (HLD 9.1)."""

from __future__ import annotations

from enum import Enum
from typing import Self

import uuid_utils
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    model_validator,
)

from esper.contracts.base import (
    Timestamp,
    VersionedContract,
    describe_validation_error,
    utcnow,
)
from esper.contracts.operational import (
    AllocationCommand,
    BlueprintSubmitted,
    CompilationFailed,
    DaemonHeartbeat,
    EpochEvent,
    FieldReport,
    HealthSignal,
    HealthSummaryReport,
    KasminaControlCommand,
    KernelCharacterized,
    KernelReady,
    NissaAlert,
    RunControl,
    SeedTransition,
    TamiyoDecision,
)
from esper.errors import BadInputError


class Topic(str, Enum):
    """Every stream on Oona; the Redis key is `esper:<topic>`."""

    TELEMETRY_SEED_HEALTH = "telemetry.seed.health"
    CONTROL_KASMINA_COMMANDS = "control.kasmina.commands"
    INNOVATION_FIELD_REPORTS = "innovation.field_reports"
    COMPILATION_BLUEPRINT_SUBMITTED = "compilation.blueprint.submitted"
    COMPILATION_KERNEL_READY = "compilation.kernel.ready"
    COMPILATION_FAILED = "compilation.failed"
    VALIDATION_KERNEL_CHARACTERIZED = "validation.kernel.characterized"
    SYSTEM_EVENTS_EPOCH = "system.events.epoch"
    LIFECYCLE_SEED_TRANSITIONS = "lifecycle.seed.transitions"
    CONTROL_TAMIYO_DECISIONS = "control.tamiyo.decisions"
    CONTROL_RUN = "control.run"
    CONTROL_HIERARCHY_SUMMARY = "control.hierarchy.summary"
    CONTROL_HIERARCHY_ALLOCATION = "control.hierarchy.allocation"
    SYSTEM_HEARTBEATS = "system.heartbeats"
    SYSTEM_ALERTS = "system.alerts"

    @property
    def stream_key(self) -> str:
        return f"esper:{self.value}"


TOPIC_PAYLOADS: dict[Topic, type[VersionedContract]] = {
    Topic.TELEMETRY_SEED_HEALTH: HealthSignal,
    Topic.CONTROL_KASMINA_COMMANDS: KasminaControlCommand,
    Topic.INNOVATION_FIELD_REPORTS: FieldReport,
    Topic.COMPILATION_BLUEPRINT_SUBMITTED: BlueprintSubmitted,
    Topic.COMPILATION_KERNEL_READY: KernelReady,
    Topic.COMPILATION_FAILED: CompilationFailed,
    Topic.VALIDATION_KERNEL_CHARACTERIZED: KernelCharacterized,
    Topic.SYSTEM_EVENTS_EPOCH: EpochEvent,
    Topic.LIFECYCLE_SEED_TRANSITIONS: SeedTransition,
    Topic.CONTROL_TAMIYO_DECISIONS: TamiyoDecision,
    Topic.CONTROL_RUN: RunControl,
    Topic.CONTROL_HIERARCHY_SUMMARY: HealthSummaryReport,
    Topic.CONTROL_HIERARCHY_ALLOCATION: AllocationCommand,
    Topic.SYSTEM_HEARTBEATS: DaemonHeartbeat,
    Topic.SYSTEM_ALERTS: NissaAlert,
}


# UUIDv7: unique, and its text sorts by creation time (millisecond prefix).
EVENT_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


def new_event_id() -> str:
    return str(uuid_utils.uuid7())


class Envelope(VersionedContract):
    """Every bus message: routing and tracing metadata around the topic's contract.

    `Envelope.wrap` and `Envelope.from_json` return the topic's typed envelope (a subclass whose
    `payload` is that topic's contract), so a message is validated once: when it is built, or
    in one strict pass over the JSON when it is received.
    """

    event_id: str = Field(default_factory=new_event_id, pattern=EVENT_ID_PATTERN)
    topic: Topic
    sender_id: str = Field(min_length=1, max_length=200)
    timestamp: Timestamp = Field(default_factory=utcnow)
    # A message that starts a trace is its own root: the trace id defaults to the event id.
    trace_id: str = Field(default_factory=lambda data: data["event_id"], min_length=1,
                          max_length=200)
    payload: SerializeAsAny[VersionedContract]

    @model_validator(mode="after")
    def _payload_matches_topic(self) -> Self:
        expected = TOPIC_PAYLOADS[self.topic]
        if type(self.payload) is not expected:
            raise ValueError(f"topic {self.topic.value} carries {expected.__name__}, "
                             f"not {type(self.payload).__name__}")
        return self

    @property
    def message(self) -> VersionedContract:
        """The payload, as its topic's contract."""
        return self.payload

    @classmethod
    def wrap(cls, topic: Topic, message: VersionedContract, *, sender_id: str,
             trace_id: str | None = None) -> Envelope:
        expected = TOPIC_PAYLOADS[topic]
        if type(message) is not expected:
            raise TypeError(f"topic {topic.value} carries {expected.__name__}, "
                            f"not {type(message).__name__}")
        extra = {"trace_id": trace_id} if trace_id else {}
        # `message` is already a validated contract: the typed envelope takes it as it is.
        return _TYPED_ENVELOPES[topic](topic=topic, sender_id=sender_id, payload=message, **extra)

    @classmethod
    def from_json(cls, data: str | bytes, *, source: str = "") -> Envelope:
        """Parse a bus entry: read the topic, then validate the whole envelope in one pass."""
        try:
            topic = _EnvelopeTopic.model_validate_json(data).topic
            return _TYPED_ENVELOPES[topic].model_validate_json(data)
        except ValidationError as e:
            raise BadInputError(describe_validation_error(e, "Envelope", source)) from None


class _EnvelopeTopic(BaseModel):
    """Just the routing key of an envelope; the rest is validated by the typed envelope."""

    model_config = ConfigDict(extra="ignore", strict=True)
    topic: Topic


_TYPED_ENVELOPES: dict[Topic, type[Envelope]] = {
    topic: create_model(f"Envelope[{payload.__name__}]", __base__=Envelope,
                        payload=(payload, ...))
    for topic, payload in TOPIC_PAYLOADS.items()
}
