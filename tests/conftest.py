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


@pytest.fixture
def ws(tmp_path) -> Workspace:
    """A workspace made as a user makes one, through the CLI: `esper library init` (catalog and
    standard blueprints). Modules that need another kind (a short path for the Redis socket)
    define their own."""
    from typer.testing import CliRunner

    from esper_cli.main import app

    ws = Workspace(tmp_path / "ws")
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "library", "init"])
    assert result.exit_code == 0, result.output
    return ws
