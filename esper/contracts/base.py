"""The base of every data contract: strict, closed, versioned, JSON round-trip.

Strict means no silent coercion (`"3"` is not an int, `1` is not a bool). Contracts travel as
JSON, so the one parser is `from_json`: JSON strings are accepted for enums and datetimes,
which strict validation of Python objects would refuse.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from esper.errors import BadInputError

SCHEMA_VERSION = 1

# A sha256 digest in hex: the id of every content-addressed thing (IRs, blobs, audit rows).
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# A seed is named by its layer and its chunk index: "3:17".
SeedId = Annotated[str, Field(pattern=r"^\d+:\d+$")]
Timestamp = AwareDatetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def seed_id(layer_id: int, seed_index: int) -> str:
    return f"{layer_id}:{seed_index}"


class Contract(BaseModel):
    """A strict, closed value object. Nested inside versioned contracts."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_enum_values=False)

    def to_json(self) -> str:
        return self.model_dump_json()

    def to_jsonable(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: str | bytes, *, source: str = "") -> Self:
        """Parse JSON text into this contract; a failure is a BadInputError naming the field."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise BadInputError(describe_validation_error(e, cls.__name__, source)) from None

    @classmethod
    def from_jsonable(cls, obj: Any, *, source: str = "") -> Self:
        """Parse an already-decoded JSON value (a dict from json.loads)."""
        return cls.from_json(json.dumps(obj), source=source)


class VersionedContract(Contract):
    """A top-level contract: a message payload or a stored record."""

    schema_version: Literal[1] = SCHEMA_VERSION


def describe_validation_error(e: ValidationError, what: str, source: str = "") -> str:
    """One line naming the first bad field: `config.yaml: field 'a.b': Input should be ...`."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    where = f"{source}: " if source else ""
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}invalid {what}: field '{loc}': {err['msg']}{more}"
