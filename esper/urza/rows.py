"""Catalog rows on the way out: every blueprint and kernel leaves Urza as a validated contract."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from esper.contracts import Blueprint, CompiledKernelArtifact, Contract
from esper.errors import BadInputError, IntegrityError

C = TypeVar("C", bound=Contract)


def kernel_select(*extra_columns: str) -> str:
    """Every column a kernel contract needs, with its tags (sorted) and its applied report."""
    extra = "".join(f",\n       {column}" for column in extra_columns)
    return f"""
SELECT k.*,
       (SELECT json_group_array(tag)
          FROM (SELECT tag FROM kernel_tags t WHERE t.kernel_id = k.id ORDER BY tag)) AS tags_json,
       r.body AS report_body{extra}
  FROM kernels k
  LEFT JOIN validation_reports r ON r.id = k.validation_report_id
"""


KERNEL_SELECT = kernel_select()

# Prefixes that are looked up: at least 4 characters (like git), and only characters that ids
# are made of, so the GLOB pattern built from one has no wildcard in it.
MIN_PREFIX = 4
_BLUEPRINT_PREFIX = re.compile(r"[0-9a-f]{1,64}")
_KERNEL_PREFIX = re.compile(r"[0-9a-z_-]{1,128}")


def prefix_pattern(text: object, what: str) -> str | None:
    """A GLOB pattern for an id or unique prefix, or None if `text` cannot name a `what`."""
    if not isinstance(text, str):
        raise BadInputError(f"a {what} id must be a string, not {type(text).__name__}")
    grammar = _BLUEPRINT_PREFIX if what == "blueprint" else _KERNEL_PREFIX
    if not grammar.fullmatch(text):
        return None
    if len(text) < MIN_PREFIX:
        raise BadInputError(f"{what} id prefix {text!r} is too short: give at least "
                            f"{MIN_PREFIX} characters")
    return text + "*"


def parse_stored(cls: type[C], obj: dict[str, Any], what: str) -> C:
    """Build a contract from stored values; a row that does not parse is catalog damage."""
    try:
        return cls.from_jsonable(obj, source=f"urza.db {what}")
    except BadInputError as e:
        raise IntegrityError(str(e)) from None


def kernel_from_row(row: dict[str, Any]) -> CompiledKernelArtifact:
    obj = {
        "id": row["id"],
        "blueprint_id": row["blueprint_id"],
        "status": row["status"],
        "compilation_pipeline": row["pipeline"],
        "interface": {"kind": row["interface_kind"], "in_features": row["in_features"],
                      "out_features": row["out_features"], "stride": row["stride"]},
        "target": row["target"],
        "dtype": row["dtype"],
        "toolchain_hash": row["toolchain_hash"],
        "kernel_binary_ref": row["kernel_binary_ref"],
        "compilation": json.loads(row["compilation"]) if row["compilation"] else None,
        "tags": json.loads(row["tags_json"]),
        "validation_report": json.loads(row["report_body"]) if row["report_body"] else None,
        "status_reason": row["status_reason"],
        "created_at": row["created_at"],
    }
    return parse_stored(CompiledKernelArtifact, obj, f"kernel {row['id']}")


def blueprint_from_row(row: dict[str, Any],
                       artifacts: list[CompiledKernelArtifact] = ()) -> Blueprint:
    obj = {
        "id": row["id"],
        "name": row["name"],
        "status": row["status"],
        "architecture_ref": row["architecture_ref"],
        "interface_kind": row["interface_kind"],
        "origin": row["origin"],
        "parent_ids": json.loads(row["parent_ids"]),
        "status_reason": row["status_reason"],
        "tamiyo_interest": row["tamiyo_interest"],
        "metadata": json.loads(row["metadata"]),
        "created_at": row["created_at"],
    }
    blueprint = parse_stored(Blueprint, obj, f"blueprint {row['id']}")
    if artifacts:
        # Already-validated contracts: attach them without a second round of parsing.
        portfolio = {a.id: a for a in artifacts}
        blueprint = blueprint.model_copy(update={"compiled_artifacts": portfolio})
    return blueprint
