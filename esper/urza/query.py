"""Tamiyo's KernelQuery as one SQL statement (DESIGN.md section 5, HLD 8.1.2).

Only VALIDATED kernels. Tag lists travel as JSON arrays bound to one parameter each and are
unpacked with `json_each`, so the statement text never depends on the values.
"""

from __future__ import annotations

import json
from typing import Any

from esper.contracts import KernelQuery
from esper.urza.rows import kernel_select

_TAGS_IN = "t.kernel_id = k.id AND t.tag IN (SELECT value FROM json_each({param}))"


def kernel_query_sql(q: KernelQuery) -> tuple[str, dict[str, Any]]:
    where = ["k.status = 'VALIDATED'"]
    params: dict[str, Any] = {"preferred": json.dumps(sorted(set(q.preferred_tags))),
                              "limit": q.limit}
    if q.blueprint_id is not None:
        where.append("k.blueprint_id = :blueprint_id")
        params["blueprint_id"] = q.blueprint_id
    if q.interface is not None:
        where.append("k.interface_kind = :kind AND k.in_features = :in_features"
                     " AND k.out_features = :out_features AND k.stride = :stride")
        params |= {"kind": q.interface.kind.value, "in_features": q.interface.in_features,
                   "out_features": q.interface.out_features, "stride": q.interface.stride}
    for column, value in (("target", q.target), ("dtype", q.dtype),
                          ("pipeline", q.pipeline.value if q.pipeline else None)):
        if value is not None:
            where.append(f"k.{column} = :{column}")
            params[column] = value
    if q.required_tags:
        # Tags are unique per kernel, so "has them all" is "matches as many as there are".
        required = sorted(set(q.required_tags))
        where.append("(SELECT count(*) FROM kernel_tags t WHERE "
                     + _TAGS_IN.format(param=":required") + ") = :n_required")
        params |= {"required": json.dumps(required), "n_required": len(required)}
    if q.excluded_tags:
        where.append("NOT EXISTS (SELECT 1 FROM kernel_tags t WHERE "
                     + _TAGS_IN.format(param=":excluded") + ")")
        params["excluded"] = json.dumps(sorted(set(q.excluded_tags)))
    # A cap excludes kernels with no measurement: an unmeasured kernel cannot show it fits.
    if q.max_latency_ms is not None:
        where.append("k.latency_ms <= :max_latency_ms")
        params["max_latency_ms"] = q.max_latency_ms
    if q.max_memory_mb is not None:
        where.append("k.memory_mb <= :max_memory_mb")
        params["max_memory_mb"] = q.max_memory_mb
    preferred_hits = ("(SELECT count(*) FROM kernel_tags t WHERE "
                      + _TAGS_IN.format(param=":preferred") + ") AS preferred_hits")
    sql = (kernel_select(preferred_hits) + " WHERE " + " AND ".join(where)
           + " ORDER BY preferred_hits DESC, k.latency_ms IS NULL, k.latency_ms, k.id"
           + " LIMIT :limit")
    return sql, params
