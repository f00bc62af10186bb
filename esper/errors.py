"""The error hierarchy: every failure Esper reports carries the exit code of DESIGN.md section 14.

Domain code raises these; the CLI turns them into one line on stderr and the exit code.
Nothing else in the SDK decides exit codes.
"""

from __future__ import annotations


class EsperError(Exception):
    """A failure Esper can explain in one line. Exit code 1: a runtime failure."""

    exit_code = 1


class BadInputError(EsperError):
    """Bad usage, config or input (a malformed file, an unknown id, a bad URL). Exit code 2."""

    exit_code = 2


class NotFoundError(BadInputError):
    """An id, path or name that does not exist. Exit code 2."""


class IntegrityError(EsperError):
    """A bad signature, a hash mismatch, a broken audit chain. Exit code 3."""

    exit_code = 3


class IllegalTransitionError(EsperError):
    """A status or lifecycle transition the state machine does not allow."""


class BusUnavailableError(EsperError):
    """Redis cannot be reached or started."""
