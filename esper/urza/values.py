"""How the catalog writes values down: timestamps, JSON, names."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

from esper.errors import BadInputError

E = TypeVar("E", bound=Enum)

# Run ids, policy names and versions become directory names (runs/<run_id>/): no separators,
# no leading dot, nothing a shell or a path join could misread.
_PATH_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def now_iso() -> str:
    return to_iso(datetime.now(UTC))


def to_iso(moment: datetime) -> str:
    """One fixed format (UTC, microseconds) so that stored timestamps sort as text."""
    if moment.tzinfo is None:
        raise BadInputError(f"timestamp {moment!r} has no timezone")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_json(value: Any, *, what: str = "value") -> str:
    """Sorted keys, no spaces: one text per value, so it can be hashed and compared."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"{what} is not JSON-serializable: {e}") from None


def require_text(value: object, what: str, max_length: int = 200) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise BadInputError(f"{what} must be a non-empty string of at most {max_length} "
                            f"characters, not {value!r}")
    return value


def require_path_safe(value: object, what: str) -> str:
    """A name that will become one path component: letters, digits, `.`, `_`, `-`."""
    if not isinstance(value, str) or not _PATH_SAFE.fullmatch(value) or value in (".", ".."):
        raise BadInputError(f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', "
                            "'_' or '-', starting with a letter or digit")
    return value


def parse_enum(enum_type: type[E], value: object, what: str) -> E:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_type)
        raise BadInputError(f"unknown {what} {value!r} (expected one of: {allowed})") from None


def lease_window(lease_seconds: float) -> tuple[float, float]:
    """(now, lease_until) in UNIX seconds: leases are compared as numbers, never as text."""
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float)) \
            or not lease_seconds > 0:
        raise BadInputError(f"lease_seconds must be a positive number, not {lease_seconds!r}")
    now = time.time()
    return now, now + float(lease_seconds)


def lease_iso(until: float) -> str:
    return to_iso(datetime.fromtimestamp(until, UTC))
