"""Bus topics and the Envelope: "fat envelope, thin payload" (HLD 9.1)."""

from __future__ import annotations

import json
from enum import Enum
from functools import cached_property
from typing import Any, Self

from pydantic import Field, ValidationError, model_validator
from ulid import ULID

from esper.contracts.base import SCHEMA_VERSION, Timestamp, VersionedContract, utcnow
from esper.contracts.operational import (
    AllocationCommand,
    BlueprintSubmitted,
    EpochEvent,
    FieldReport,
    HealthSignal,
    HealthSummaryReport,
    KasminaControlCommand,
    KernelCharacterized,
    KernelReady,
    RunControl,
    SeedTransition,
    TamiyoDecision,
)


class Topic(str, Enum):
    """Every stream on Oona; the Redis key is `esper:<topic>`."""

    TELEMETRY_SEED_HEALTH = "telemetry.seed.health"
    CONTROL_KASMINA_COMMANDS = "control.kasmina.commands"
    INNOVATION_FIELD_REPORTS = "innovation.field_reports"
    COMPILATION_BLUEPRINT_SUBMITTED = "compilation.blueprint.submitted"
    COMPILATION_KERNEL_READY = "compilation.kernel.ready"
    VALIDATION_KERNEL_CHARACTERIZED = "validation.kernel.characterized"
    SYSTEM_EVENTS_EPOCH = "system.events.epoch"
    LIFECYCLE_SEED_TRANSITIONS = "lifecycle.seed.transitions"
    CONTROL_TAMIYO_DECISIONS = "control.tamiyo.decisions"
    CONTROL_RUN = "control.run"
    CONTROL_HIERARCHY_SUMMARY = "control.hierarchy.summary"
    CONTROL_HIERARCHY_ALLOCATION = "control.hierarchy.allocation"

    @property
    def stream_key(self) -> str:
        return f"esper:{self.value}"


TOPIC_PAYLOADS: dict[Topic, type[VersionedContract]] = {
    Topic.TELEMETRY_SEED_HEALTH: HealthSignal,
    Topic.CONTROL_KASMINA_COMMANDS: KasminaControlCommand,
    Topic.INNOVATION_FIELD_REPORTS: FieldReport,
    Topic.COMPILATION_BLUEPRINT_SUBMITTED: BlueprintSubmitted,
    Topic.COMPILATION_KERNEL_READY: KernelReady,
    Topic.VALIDATION_KERNEL_CHARACTERIZED: KernelCharacterized,
    Topic.SYSTEM_EVENTS_EPOCH: EpochEvent,
    Topic.LIFECYCLE_SEED_TRANSITIONS: SeedTransition,
    Topic.CONTROL_TAMIYO_DECISIONS: TamiyoDecision,
    Topic.CONTROL_RUN: RunControl,
    Topic.CONTROL_HIERARCHY_SUMMARY: HealthSummaryReport,
    Topic.CONTROL_HIERARCHY_ALLOCATION: AllocationCommand,
}


def new_event_id() -> str:
    """A ULID: unique, and sorts by creation time."""
    return str(ULID())


class Envelope(VersionedContract):
    """Every bus message. The payload is the JSON form of the topic's contract, checked on parse."""

    event_id: str = Field(default_factory=new_event_id, pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")
    topic: Topic
    sender_id: str = Field(min_length=1, max_length=200)
    timestamp: Timestamp = Field(default_factory=utcnow)
    trace_id: str = Field(default_factory=new_event_id, min_length=1, max_length=200)
    payload: dict[str, Any]

    @classmethod
    def wrap(cls, topic: Topic, message: VersionedContract, *, sender_id: str,
             trace_id: str | None = None) -> Self:
        expected = TOPIC_PAYLOADS[topic]
        if not isinstance(message, expected):
            raise TypeError(f"topic {topic.value} carries {expected.__name__}, "
                            f"not {type(message).__name__}")
        extra = {"trace_id": trace_id} if trace_id else {}
        return cls(topic=topic, sender_id=sender_id, payload=message.to_jsonable(), **extra)

    @model_validator(mode="after")
    def _payload_matches_topic(self) -> Self:
        try:
            TOPIC_PAYLOADS[self.topic].model_validate_json(json.dumps(self.payload))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            raise ValueError(f"payload field '{loc}': {err['msg']}") from None
        return self

    @cached_property
    def message(self) -> VersionedContract:
        """The payload as its topic's contract."""
        return TOPIC_PAYLOADS[self.topic].model_validate_json(json.dumps(self.payload))

