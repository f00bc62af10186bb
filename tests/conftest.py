"""Shared fixtures. Everything here is real: a real workspace on disk, real keys."""

from __future__ import annotations

import pytest

from esper.workspace import Workspace


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    """A freshly created, empty workspace (layout, keys, marker; no catalog yet)."""
    ws = Workspace(tmp_path / "ws")
    ws.create()
    return ws
