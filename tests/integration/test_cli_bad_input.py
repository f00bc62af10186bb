"""Bad input to the real CLI, on a real workspace: one line on stderr naming what is wrong and
where, the exit code of DESIGN.md section 14 (2 for input, 3 for integrity), never an
"internal error", and nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from esper.workspace import Workspace
from esper_cli.main import app

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "library", "init"])
    assert result.exit_code == 0, result.output
    return ws


def esper(ws: Workspace, *args: str):
    return CliRunner().invoke(app, ["--workspace", str(ws.root), *args])


def one_error_line(result, code: int, *expected: str) -> str:
    """The result's one stderr line, checked: the exit code, each expected text, no bug report."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1, result.stderr
    assert "internal error" not in lines[0] and all(e in lines[0] for e in expected), lines[0]
    return lines[0]


@pytest.mark.parametrize("data", [PNG, bytes(range(128, 256)) * 8], ids=["png", "random"])
@pytest.mark.parametrize("command", [["forge", "--once", "--config"],
                                     ["watch", "--once", "--alerts"], ["train"]])
def test_a_binary_config_file_is_named_not_decoded(ws, tmp_path, command, data):
    config = tmp_path / "picture.yaml"
    config.write_bytes(data)
    result = esper(ws, *command, str(config))
    one_error_line(result, 2, "picture.yaml", "not a text file")


def test_a_directory_as_forge_config_is_called_one(ws, tmp_path):
    result = esper(ws, "forge", "--once", "--config", str(tmp_path))
    one_error_line(result, 2, str(tmp_path), "not a file")
