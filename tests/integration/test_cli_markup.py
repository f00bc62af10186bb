"""Ids, paths, names and messages reach the terminal as they are: the CLI's rich consoles read no
markup (`[/]` used to raise MarkupError, `[bold]` vanished) and no emoji codes (`linear:-1:16`
showed a thumbs-down), in error lines, summaries, tables and records. The real CLI app on a real
workspace; stderr and stdout as a user sees them."""

from __future__ import annotations

import json

import pytest
from catalog_helpers import blueprint
from typer.testing import CliRunner

from esper.urza import Urza
from esper.workspace import Workspace
from esper_cli.main import app

# Closing tags, an opening tag, an emoji code and a regex's character class, in one string.
ODD = "odd[/]name [bold]x[/x] :-1: ^[a-z0-9_]+$"


def esper(ws: Workspace, *args: str):
    return CliRunner().invoke(app, ["--workspace", str(ws.root), *args], catch_exceptions=False)


@pytest.mark.parametrize("args, shown", [
    (["library", "show", "abcd[/]"], "'abcd[/]'"),
    (["train", "{tmp}/a[/x]b.yaml"], "{tmp}/a[/x]b.yaml: no such config file"),
    (["train", "{tmp}/[bold]nope.yaml"], "{tmp}/[bold]nope.yaml: no such config file"),
    (["library", "query", "--interface", "linear:-1:16"], "bad interface 'linear:-1:16'"),
    (["library", "query", "--tag", "X!"], "String should match pattern '^[a-z0-9_]+$'"),
])
def test_an_error_line_shows_the_input_as_given(ws, tmp_path, args, shown):
    result = esper(ws, *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and shown.format(tmp=tmp_path) in line


def test_tables_and_records_show_names_as_given(ws):
    with Urza.open(ws) as urza:
        odd = blueprint(urza, ODD)
    listed = esper(ws, "library", "list", "--origin", odd.origin)
    assert listed.exit_code == 0 and ODD in listed.stdout
    shown = esper(ws, "library", "show", odd.id)
    assert shown.exit_code == 0
    assert f"Blueprint {odd.id}" in shown.stdout and f"name: {ODD}" in shown.stdout


def test_lineage_tables_show_the_file_as_given(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "lineage.json").write_text(json.dumps({
        "run_id": "run[/]1",
        "adaptations": [{"seed_id": "0:[/]1", "layer": "[bold]fc", "audit": [],
                         "kernel_artifact_id": "k:-1:"}],
        "other_outcomes": [{"seed_id": "0:2", "kernel_artifact_id": "k2", "outcome": "CULLED",
                            "epoch": 3, "reason": "loss [/] rose :-1:"}]}))
    result = esper(Workspace(tmp_path / "no-ws"), "library", "lineage", str(run))
    assert result.exit_code == 0, result.output
    for text in ["lineage of run[/]1", "0:[/]1", "[bold]fc", "k:-1:", "loss [/] rose :-1:"]:
        assert text in result.stdout, text


@pytest.mark.parametrize("daemon", ["forge", "bench"])
def test_a_daemon_summary_shows_the_worker_id_as_given(workspace, daemon):
    Urza.open(workspace).close()
    extra = ["--no-idle"] if daemon == "forge" else []
    result = esper(workspace, daemon, "--once", *extra, "--worker-id", "a[/]b:-1:")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{daemon} a[/]b:-1:: ")
