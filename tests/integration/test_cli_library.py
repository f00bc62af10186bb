"""`esper library` end to end through the real CLI app: real workspace, SQLite, keys."""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from esper import signing
from esper.blueprints import standard_library
from esper.contracts import (
    LATENCY_MS,
    MEMORY_MB,
    CompilationPipeline,
    CompiledKernelArtifact,
    KernelInterface,
    UrabraskValidationReport,
)
from esper.urza import Urza
from esper.workspace import Workspace
from esper_cli.main import app

SUBCOMMANDS = ["init", "list", "show", "query", "import", "export", "verify", "stats", "lineage"]


def esper(ws: Workspace | None, *args: str):
    """Run `esper` in-process; stderr separate, as a terminal user sees it."""
    prefix = ["--workspace", str(ws.root)] if ws else []
    return CliRunner().invoke(app, [*prefix, *args], catch_exceptions=False)


def snapshot(ws: Workspace) -> tuple:
    """Everything a failed command must leave untouched: rows of every table, and the blobs."""
    conn = sqlite3.connect(ws.db_path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    rows = tuple((t, tuple(conn.execute(f"SELECT * FROM {t}").fetchall())) for t in sorted(tables))
    conn.close()
    blobs = tuple(sorted(p.name for p in ws.artifacts_dir.rglob("*") if p.is_file()))
    return rows, blobs


def test_help_lists_only_working_subcommands():
    result = esper(None, "--help")
    assert result.exit_code == 0
    assert "library" in result.output
    for built in ["library", "forge", "bench", "train", "watch"]:
        assert built in result.output
    for unbuilt in ["karn", "simic"]:
        assert f" {unbuilt} " not in result.output
    result = esper(None, "library", "--help")
    assert result.exit_code == 0
    for sub in SUBCOMMANDS:
        assert sub in result.output


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_help_has_an_example(sub):
    result = esper(None, "library", sub, "--help")
    assert result.exit_code == 0
    assert "Example: esper" in result.output


def test_init_loads_the_standard_library_once(ws):
    names = {ir.name for ir in standard_library()}
    assert 15 <= len(names) <= 20
    listed = json.loads(esper(ws, "--json", "library", "list").stdout)
    assert {b["name"] for b in listed} == names
    assert all(b["status"] == "UNVALIDATED" and b["origin"] == "library" for b in listed)
    again = esper(ws, "--json", "library", "init")
    assert json.loads(again.stdout)["blueprints_added"] == 0
    assert len(json.loads(esper(ws, "--json", "library", "list").stdout)) == len(names)
    table = esper(ws, "library", "list")
    assert table.exit_code == 0 and "mlp_relu_w16" in table.stdout


def test_show_by_prefix_and_unknown_id(ws):
    first = json.loads(esper(ws, "--json", "library", "list").stdout)[0]
    shown = esper(ws, "--json", "library", "show", first["id"][:10])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["id"] == first["id"]
    missing = esper(ws, "library", "show", "deadbeef00")
    assert missing.exit_code == 2
    assert "deadbeef00" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_import_export_round_trip_and_duplicates(ws, tmp_path):
    first = json.loads(esper(ws, "--json", "library", "list").stdout)[0]
    exported = tmp_path / "bp.json"
    assert esper(ws, "library", "export", first["id"][:12], "-o", str(exported)).exit_code == 0
    again = esper(ws, "--json", "library", "import", str(exported))
    assert again.exit_code == 0
    assert json.loads(again.stdout) == [{"source": str(exported), "id": first["id"],
                                         "name": first["name"], "created": False}]

    ir = json.loads(exported.read_text())
    ir["name"] = "my_variant"
    variant = tmp_path / "variant.json"
    variant.write_text(json.dumps(ir))
    added = esper(ws, "--json", "library", "import", str(variant))
    assert added.exit_code == 0 and json.loads(added.stdout)[0]["created"] is True
    listed = json.loads(esper(ws, "--json", "library", "list", "--origin", "human").stdout)
    assert [b["name"] for b in listed] == ["my_variant"]


def _bad_irs(good: dict) -> dict[str, tuple[str, str]]:
    """name -> (file text, what the one-line error must mention)."""
    unknown_op = json.loads(json.dumps(good))
    unknown_op["nodes"][1]["op"] = "fourier_magic"
    wrong_width = json.loads(json.dumps(good))
    for node in wrong_width["nodes"]:
        if node["op"] == "linear" and node.get("attrs", {}).get("out") == "out":
            node["attrs"]["out"] = 7
    return {
        "malformed": ('{"format": "esper.blueprint/1", "nodes": [', "malformed.json"),
        "unknown_op": (json.dumps(unknown_op), "op_whitelist"),
        "shape_mismatch": (json.dumps(wrong_width), "interface"),
        "not_an_ir": ('{"hello": "world"}', "not_an_ir.json"),
    }


@pytest.mark.parametrize("case", ["malformed", "unknown_op", "shape_mismatch", "not_an_ir"])
def test_bad_ir_is_one_line_exit_2_and_changes_nothing(ws, tmp_path, case):
    exported = tmp_path / "good.json"
    mlp = next(b for b in json.loads(esper(ws, "--json", "library", "list").stdout)
               if b["name"] == "mlp_relu_w16")
    esper(ws, "library", "export", mlp["id"], "-o", str(exported))
    text, expected = _bad_irs(json.loads(exported.read_text()))[case]
    bad = tmp_path / f"{case}.json"
    bad.write_text(text)
    good_new = tmp_path / "good_new.json"
    good_ir = json.loads(exported.read_text())
    good_ir["name"] = "would_be_added"
    good_new.write_text(json.dumps(good_ir))

    before = snapshot(ws)
    result = esper(ws, "library", "import", str(good_new), str(bad))  # all or none
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(ws) == before


def test_missing_file_and_missing_workspace(tmp_path):
    result = esper(Workspace(tmp_path / "nowhere"), "library", "list")
    assert result.exit_code == 2 and "no Esper workspace" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_bad_cli_arguments_exit_2(ws):
    assert esper(ws, "library", "list", "--kind", "widgets").exit_code == 2
    bad_status = esper(ws, "library", "list", "--status", "SHINY")
    assert bad_status.exit_code == 2 and "SHINY" in bad_status.stderr
    bad_iface = esper(ws, "library", "query", "--interface", "linear:12")
    assert bad_iface.exit_code == 2 and "linear:12" in bad_iface.stderr
    bad_limit = esper(ws, "library", "query", "--limit", "0")
    assert bad_limit.exit_code == 2 and "limit" in bad_limit.stderr


def _add_validated_kernel(urza: Urza, ws: Workspace, blueprint_id: str, *, tags: list[str],
                          latency: float, memory: float, suffix: str) -> str:
    manifest = urza.store.put(json.dumps({"kernel": suffix}).encode())
    kernel = CompiledKernelArtifact(
        id=f"{blueprint_id[:12]}-cpu-fast-{suffix}", blueprint_id=blueprint_id,
        compilation_pipeline=CompilationPipeline.FAST,
        interface=KernelInterface.parse("linear:64:16"), target="cpu", toolchain_hash=suffix,
        kernel_binary_ref=manifest)
    urza.add_kernel(kernel, actor="test")
    report = UrabraskValidationReport(
        kernel_artifact_id=kernel.id, blueprint_id=blueprint_id, passed_validation=True,
        benchmark_results={LATENCY_MS: latency, MEMORY_MB: memory}, generated_tags=tags)
    signed = signing.sign(report.to_json().encode(), ws.private_key("bench"), "bench")
    urza.apply_validation_report(signed, actor="test")
    return kernel.id


def test_query_filters_by_tag_and_ranks_by_latency(ws):
    blueprints = [b for b in json.loads(esper(ws, "--json", "library", "list").stdout)
                  if b["interface_kind"] == "linear"]
    with Urza.open(ws) as urza:
        slow = _add_validated_kernel(urza, ws, blueprints[0]["id"], tags=["low_memory"],
                                     latency=2.0, memory=1.0, suffix="aaaaaa")
        fast = _add_validated_kernel(urza, ws, blueprints[1]["id"], tags=["low_memory"],
                                     latency=0.5, memory=1.0, suffix="bbbbbb")
        _add_validated_kernel(urza, ws, blueprints[2]["id"], tags=["high_memory"], latency=0.1,
                              memory=90.0, suffix="cccccc")
    result = esper(ws, "--json", "library", "query", "--tag", "low_memory")
    assert result.exit_code == 0
    assert [k["id"] for k in json.loads(result.stdout)] == [fast, slow]
    capped = esper(ws, "--json", "library", "query", "--tag", "low_memory",
                   "--max-latency-ms", "1.0", "--interface", "linear:64:16")
    assert [k["id"] for k in json.loads(capped.stdout)] == [fast]
    other_iface = esper(ws, "--json", "library", "query", "--interface", "linear:64:8")
    assert json.loads(other_iface.stdout) == []
    listed = esper(ws, "--json", "library", "list", "--kind", "kernels", "--tag", "high_memory")
    assert len(json.loads(listed.stdout)) == 1
    assert esper(ws, "library", "query", "--tag", "low_memory").exit_code == 0
    shown = json.loads(esper(ws, "--json", "library", "show", fast).stdout)
    assert shown["id"] == fast and shown["status"] == "VALIDATED"
    assert shown["validation_report"]["benchmark_results"][LATENCY_MS] == 0.5
    # A bare prefix names the blueprint, even though its kernels' ids start with it too.
    blueprint = json.loads(esper(ws, "--json", "library", "show", fast[:12]).stdout)
    assert blueprint["id"].startswith(fast[:12]) and fast in blueprint["compiled_artifacts"]


def test_verify_passes_then_catches_a_tampered_blob(ws):
    ok = esper(ws, "library", "verify")
    assert ok.exit_code == 0 and "intact" in ok.stdout
    blob = next(p for p in ws.artifacts_dir.rglob("*") if p.is_file())
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes().replace(b"linear", b"lineaR", 1))
    bad = esper(ws, "library", "verify")
    assert bad.exit_code == 3
    assert blob.name in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    exported = esper(ws, "library", "export", blob.name)
    assert exported.exit_code == 3 and blob.name in exported.stderr


def test_verify_catches_an_edited_audit_row(ws):
    conn = sqlite3.connect(ws.db_path)
    # The table refuses edits through triggers; someone with the file can drop them.
    for (trigger,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                   "AND tbl_name = 'audit_log'").fetchall():
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = "
                 "(SELECT min(seq) + 1 FROM audit_log)")
    conn.commit()
    conn.close()
    bad = esper(ws, "--json", "library", "verify")
    assert bad.exit_code == 3 and "audit" in bad.stderr
    assert json.loads(bad.stdout)["audit"]["ok"] is False


def test_stats(ws):
    numbers = json.loads(esper(ws, "--json", "library", "stats").stdout)
    assert numbers["blueprints"] == {"UNVALIDATED": len(standard_library())}
    assert esper(ws, "library", "stats").exit_code == 0


def _exported_variant(ws: Workspace, tmp_path, name: str):
    mlp = next(b for b in json.loads(esper(ws, "--json", "library", "list").stdout)
               if b["name"] == "mlp_relu_w16")
    ir = json.loads(esper(ws, "library", "export", mlp["id"]).stdout)
    ir["name"] = name
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ir))
    return path


def test_import_announces_new_blueprints_to_a_running_bus(ws, tmp_path):
    from esper.contracts import Topic
    from esper.oona import Oona, stop_embedded

    variant = _exported_variant(ws, tmp_path, "announced")
    with Oona.connect(ws, sender_id="forge") as forge_side:  # starts the embedded server
        try:
            result = esper(ws, "--json", "library", "import", str(variant))
            assert result.exit_code == 0, result.output
            [entry] = forge_side.range(Topic.COMPILATION_BLUEPRINT_SUBMITTED)
            notice = entry.envelope.message
            assert notice.blueprint_id == json.loads(result.stdout)[0]["id"]
            assert notice.submitted_by == "human" and entry.envelope.sender_id == "library"
            # A duplicate adds nothing and announces nothing.
            assert esper(ws, "library", "import", str(variant)).exit_code == 0
            assert len(forge_side.range(Topic.COMPILATION_BLUEPRINT_SUBMITTED)) == 1
        finally:
            stop_embedded(ws)


def test_import_without_a_running_bus_starts_no_server(ws, tmp_path):
    from esper.oona import embedded_running

    assert esper(ws, "library", "import", str(_exported_variant(ws, tmp_path, "quiet"))).exit_code == 0
    assert not embedded_running(ws)


def test_bad_redis_url_is_exit_2_and_changes_nothing(ws, tmp_path):
    variant = _exported_variant(ws, tmp_path, "never_added")
    before = snapshot(ws)
    result = esper(ws, "--redis-url", "http://user:hunter2@localhost:1", "library", "import",
                   str(variant))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "http://" in result.stderr
    assert "hunter2" not in result.stderr
    assert snapshot(ws) == before


def test_unreachable_redis_warns_and_the_catalog_still_takes_the_blueprint(ws, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    variant = _exported_variant(ws, tmp_path, "added_anyway")
    result = esper(ws, "--json", "--redis-url", f"redis://127.0.0.1:{port}", "library", "import",
                   str(variant))
    assert result.exit_code == 0
    assert json.loads(result.stdout)[0]["created"] is True
    assert "unreachable" in result.stderr and "poll" in result.stderr
