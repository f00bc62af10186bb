"""A damaged catalog through the real CLI: urza.db missing, emptied, garbage, corrupt or
read-only, the audit log cut short at its end, and `library export -o` at paths that are not a
plain file. Each gets one line naming the file and the exit code of DESIGN.md section 14, and
nothing is created or replaced on the way. Real workspaces, SQLite files, FIFOs and symlinks."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess

import pytest
from catalog_helpers import mlp_ir
from process_helpers import ESPER
from typer.testing import CliRunner

from esper.errors import IntegrityError
from esper.urza import Urza
from esper.workspace import Workspace
from esper_cli.main import app


def esper(ws: Workspace, *args: str):
    return CliRunner().invoke(app, ["--workspace", str(ws.root), *args], catch_exceptions=False)


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return lines[0]


# A missing or emptied catalog -----------------------------------------------------------------

@pytest.mark.parametrize("command", [("library", "verify"), ("library", "list"),
                                     ("library", "stats"), ("library", "init")])
def test_a_deleted_catalog_is_an_integrity_failure_not_a_new_one(ws, command):
    ws.db_path.unlink()
    result = esper(ws, *command)
    assert result.exit_code == 3, result.output
    line = one_line(result)
    assert str(ws.db_path) in line and "missing" in line and "restore" in line
    assert not ws.db_path.exists()  # nothing was created in its place
    assert "intact" not in result.stdout


def test_an_emptied_catalog_is_an_integrity_failure_and_stays_as_it_is(ws):
    ws.db_path.write_bytes(b"")
    result = esper(ws, "library", "verify")
    assert result.exit_code == 3
    assert str(ws.db_path) in one_line(result) and "empty" in result.stderr
    assert ws.db_path.stat().st_size == 0


def test_a_catalog_without_tables_is_an_integrity_failure(ws):
    ws.db_path.unlink()
    conn = sqlite3.connect(ws.db_path)
    conn.execute("PRAGMA user_version = 7")  # a valid database file, with no tables
    conn.close()
    assert ws.db_path.stat().st_size > 0
    result = esper(ws, "library", "list")
    assert result.exit_code == 3
    assert str(ws.db_path) in one_line(result) and "no tables" in result.stderr


def test_the_workspace_remembers_its_catalog_even_without_blobs(tmp_path):
    ws = Workspace(tmp_path / "bare")
    ws.create()
    Urza.open(ws).close()  # the first open of a new workspace makes its catalog...
    assert "catalog_created_at" in json.loads(ws.marker.read_text())
    assert not any(p.is_file() for p in ws.artifacts_dir.rglob("*"))
    ws.db_path.unlink()
    with pytest.raises(IntegrityError, match="workspace.json records"):  # ...and only that one
        Urza.open(ws)
    assert not ws.db_path.exists()


def test_an_older_workspace_with_blobs_but_no_record_is_protected_too(ws):
    marker = json.loads(ws.marker.read_text())
    del marker["catalog_created_at"]  # as written before the record existed
    ws.marker.write_text(json.dumps(marker))
    ws.db_path.unlink()
    result = esper(ws, "library", "list")
    assert result.exit_code == 3 and "artifacts/ holds blobs" in one_line(result)


def test_init_on_a_healthy_workspace_still_reruns(ws):
    again = esper(ws, "--json", "library", "init")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["blueprints_added"] == 0
    assert esper(ws, "library", "verify").exit_code == 0


# A damaged or unwritable catalog --------------------------------------------------------------

def test_a_garbage_catalog_is_named_and_exits_3(ws):
    ws.db_path.write_bytes(os.urandom(8192))
    result = esper(ws, "library", "list")
    assert result.exit_code == 3
    line = one_line(result)
    assert str(ws.db_path) in line and "file is not a database" in line


def test_a_corrupt_catalog_is_named_and_exits_3(ws):
    data = bytearray(ws.db_path.read_bytes())
    for page in range(4096, len(data), 4096):  # every page after the header's
        data[page + 100:page + 400] = b"\xff" * 300
    ws.db_path.write_bytes(bytes(data))
    for command in (("library", "list"), ("library", "verify")):
        result = esper(ws, *command)
        assert result.exit_code == 3, result.output
        line = one_line(result)
        assert str(ws.db_path) in line and "malformed" in line


def esper_bound_by_modes(ws: Workspace, *args: str) -> subprocess.CompletedProcess:
    """The real `esper` in a child process on which file modes bind: as root, with its
    capabilities (the override of file modes among them) dropped by setpriv."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file modes cannot be made to bind")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    return subprocess.run([*prefix, ESPER, "--workspace", str(ws.root), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_read_only_catalog_is_named_and_nothing_changes(ws, tmp_path):
    ir = tmp_path / "new.json"
    ir.write_text(json.dumps(mlp_ir("not_yet_here", 24)))
    before = sqlite3.connect(ws.db_path).execute("SELECT count(*) FROM blueprints").fetchone()
    ws.db_path.chmod(0o444)
    result = esper_bound_by_modes(ws, "library", "import", str(ir))
    ws.db_path.chmod(0o644)
    assert result.returncode == 1, result.stderr
    line = one_line(result)
    assert str(ws.db_path) in line and "readonly" in line and "internal error" not in line
    after = sqlite3.connect(ws.db_path).execute("SELECT count(*) FROM blueprints").fetchone()
    assert after == before


def test_a_read_only_workspace_directory_is_named(ws):
    ws.root.chmod(0o555)
    try:
        result = esper_bound_by_modes(ws, "library", "list")
    finally:
        ws.root.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert str(ws.db_path) in one_line(result)


# The audit log cut short ----------------------------------------------------------------------

def _cut_audit_log(ws: Workspace, where: str) -> None:
    conn = sqlite3.connect(ws.db_path)
    conn.execute("DROP TRIGGER audit_log_never_deleted")  # someone with the file can
    conn.execute(f"DELETE FROM audit_log {where}")
    conn.commit()
    conn.close()


def test_verify_finds_the_last_audit_row_cut_off(ws):
    with Urza.open(ws) as urza:  # the last change: a status, not a new record
        urza.claim_next_blueprint("forge-test", 60)
        rows = urza.stats()["audit_rows"]
    assert esper(ws, "library", "verify").exit_code == 0
    _cut_audit_log(ws, "WHERE seq = (SELECT max(seq) FROM audit_log)")
    result = esper(ws, "--json", "library", "verify")
    assert result.exit_code == 3
    assert f"audit log: row {rows}: missing: blueprint" in one_line(result)
    assert json.loads(result.stdout)["audit"]["ok"] is False


def test_verify_finds_an_emptied_audit_log(ws):
    _cut_audit_log(ws, "")
    result = esper(ws, "library", "verify")
    assert result.exit_code == 3
    assert "audit log: row 1: missing: blueprint" in one_line(result)
    assert "has no audit row" in result.stderr


# export -o PATH: only ever a regular file -------------------------------------------------------



def _first_id(ws: Workspace) -> str:
    return json.loads(esper(ws, "--json", "library", "list").stdout)[0]["id"][:12]


def test_export_refuses_a_fifo(ws, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = esper(ws, "library", "export", _first_id(ws), "-o", str(fifo))
    assert result.exit_code == 2
    assert str(fifo) in one_line(result) and "FIFO" in result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_export_refuses_a_directory_and_a_missing_one(ws, tmp_path):
    result = esper(ws, "library", "export", _first_id(ws), "-o", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in one_line(result)
    missing = tmp_path / "no" / "such" / "bp.json"
    result = esper(ws, "library", "export", _first_id(ws), "-o", str(missing))
    assert result.exit_code == 2 and "does not exist" in one_line(result)
    assert not (tmp_path / "no").exists()


def test_export_through_a_symlink_writes_its_target(ws, tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert esper(ws, "library", "export", _first_id(ws), "-o", str(link)).exit_code == 0
    assert link.is_symlink() and json.loads(real.read_text())["format"] == "esper.blueprint/1"


def test_export_refuses_a_read_only_file(ws, tmp_path):
    """Run where file modes bind (as root: capabilities dropped), so the refusal is real."""
    out = tmp_path / "bp.json"
    out.write_text("keep")
    out.chmod(0o444)
    result = esper_bound_by_modes(ws, "library", "export", _first_id(ws), "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert "not writable" in result.stderr and str(out) in result.stderr
    assert out.read_text() == "keep"
