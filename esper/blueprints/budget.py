"""How large a blueprint may be: the budget rules of the static check."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from esper.contracts.base import Contract

Positive = Annotated[int, Field(gt=0)]


class Budget(Contract):
    """Limits checked by `validate`, per interface for the size-dependent ones.

    FLOPs are counted per input position (one row of a linear host's input, one pixel of a conv
    host's input map), a multiply-add as 2; attention's sequence-length-dependent part is counted
    at `reference_seq_len` tokens.
    """

    # 2^24 parameters: a 4096-wide host's blueprint can hold two full in x in matrices at most.
    max_params: Positive = 1 << 24
    max_flops_per_position: Positive = 1 << 28
    max_depth: Positive = 32
    max_nodes: Positive = 64
    reference_seq_len: Positive = 256


DEFAULT_BUDGET = Budget()
