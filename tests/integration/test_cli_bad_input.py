"""Bad input to the real CLI, on a real workspace: one line on stderr naming what is wrong and
where, the exit code of DESIGN.md section 14 (2 for input, 3 for integrity), never an
"internal error", and nothing written."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tolaria_helpers import tiny_config
from typer.testing import CliRunner

from esper.workspace import Workspace
from esper_cli.main import app

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"


def esper(ws: Workspace, *args: str):
    return CliRunner().invoke(app, ["--workspace", str(ws.root), *args])


def one_error_line(result, code: int, *expected: str) -> str:
    """The one stderr line of a CliRunner or subprocess result, checked: the exit code, each
    expected text, no bug report."""
    lines = result.stderr.strip().splitlines()
    exit_code = (result.returncode if isinstance(result, subprocess.CompletedProcess)
                 else result.exit_code)
    assert exit_code == code, result.stderr
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


LINEAGE = {"format": "esper.lineage/1", "run_id": "r", "other_outcomes": [],
           "adaptations": [{"seed_id": "1:0", "layer": "layers.1", "kernel_artifact_id": "k",
                            "metric": "validation_loss", "pre_metric": 0.5, "post_metric": 0.4,
                            "germinated_epoch": 2, "fossilized_epoch": 9, "parameters": 16,
                            "audit": []}]}


@pytest.mark.parametrize(("edit", "field"), [
    ([LINEAGE], "(root)"),
    ({**LINEAGE, "adaptations": {"1:0": {}}}, "adaptations"),
    ({**LINEAGE, "adaptations": [7]}, "adaptations.0"),
    ({**LINEAGE, "adaptations": [{**LINEAGE["adaptations"][0], "pre_metric": "0.5"}]},
     "adaptations.0.pre_metric"),
    ({**LINEAGE, "adaptations": [{**LINEAGE["adaptations"][0], "audit": [{"seq": "x",
                                                                          "row_hash": "h"}]}]},
     "adaptations.0.audit.0.seq"),
    ({**LINEAGE, "run_id": 5}, "run_id"),
    ({**LINEAGE, "other_outcomes": "none"}, "other_outcomes"),
])
def test_a_lineage_file_of_the_wrong_shape_is_named_with_its_field(ws, tmp_path, edit, field):
    """Exit 2, as for a lineage.json that is not JSON at all: exit 3 is kept for evidence that
    the workspace's audit chain contradicts."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "lineage.json").write_text(json.dumps(LINEAGE))
    assert esper(ws, "library", "lineage", str(run)).exit_code == 0
    (run / "lineage.json").write_text(json.dumps(edit))
    result = esper(ws, "library", "lineage", str(run))
    one_error_line(result, 2, "lineage.json", f"field '{field}'")


def test_a_metrics_host_or_port_that_cannot_be_bound_is_one_line(ws):
    result = esper(ws, "watch", "--once", "--metrics-port", "0", "--metrics-host", "bad..host")
    one_error_line(result, 2, "'bad..host'", "not a valid host name")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = esper(ws, "watch", "--once", "--metrics-port", port)
        one_error_line(result, 2, f"port {port}", "Address already in use")


CTOR_RAISES = ("from torch import nn\n\nclass Model(nn.Module):\n"
               "    def __init__(self, input_shape, out_dim, widths):\n"
               "        raise ValueError('widths must be positive')\n")


@pytest.mark.parametrize(("source", "expected"), [
    ('raise RuntimeError("boom")\n', ["'my_model'", "RuntimeError: boom"]),
    ("def model(:\n", ["'my_model'", "SyntaxError: invalid syntax"]),
    (CTOR_RAISES, ["'my_model:Model'", "ValueError: widths must be positive"]),
    ("def Model(input_shape, out_dim, widths):\n    raise ValueError('widths must be positive')\n",
     ["'my_model:Model'", "ValueError: widths must be positive"]),
    (("def Model(input_shape, out_dim, widths):\n"
      "    raise ValueError('bad widths:\\n  layer 0: 0\\n  layer 1: -3')\n"),
     ["'my_model:Model'", "ValueError: bad widths: layer 0: 0 / layer 1: -3"]),
], ids=["import-raises", "syntax-error", "class-raises", "function-raises", "multi-line-error"])
def test_a_model_that_fails_to_import_or_build_is_named_and_leaves_no_run(ws, tmp_path, source,
                                                                         expected):
    """The user's model module raises as it is imported, or building the model raises: one
    line naming the field, the module or model and the error, exit 2, no run folder; the same
    --run-id runs once the model is fixed. The real `esper` in the directory that holds the
    module, as `python -m` runs."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(epochs=1).model_dump(mode="json")))
    module = tmp_path / "my_model.py"
    module.write_text(source)
    command = [str(Path(sys.executable).parent / "esper"), "--workspace", str(ws.root), "train",
               str(config), "model.name=my_model:Model", "--run-id", "mine"]

    def train() -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, check=False)

    one_error_line(train(), 2, str(config), "field 'model.name'", *expected)
    assert not (ws.runs_dir / "mine").exists()
    module.write_text("from esper.tolaria.models import MLP as Model\n")
    rerun = train()
    assert rerun.returncode == 0, rerun.stderr


@pytest.mark.parametrize(("damage", "expected"), [
    (b'{"name": "tiny", "epo', "not JSON (Unterminated string"),
    (PNG, "not UTF-8 text"),
    (b'["tiny"]', "a JSON list, not an object"),
    (b'"tiny"', "a JSON str, not an object"),
    (json.dumps({**tiny_config().model_dump(mode="json"), "epochs": "many"}).encode(),
     "field 'epochs': Input should be a valid integer"),
], ids=["truncated", "binary", "list", "string", "field"])
@pytest.mark.parametrize("extra", [[], ["--epochs", "3"]], ids=["resume", "resume-epochs"])
def test_a_damaged_saved_run_config_is_named_exit_3(ws, damage, expected, extra):
    """config.json is Tolaria's, written validated as the run began: one that does not read
    back is damaged, exit 3 as for a checkpoint that does not verify (was an internal
    JSONDecodeError or UnicodeDecodeError, exit 1, or exit 2 for a list). Nothing is written."""
    run_dir = ws.runs_dir / "damaged"
    run_dir.mkdir(parents=True)
    config = run_dir / "config.json"
    config.write_bytes(damage)
    one_error_line(esper(ws, "train", "--resume", "damaged", *extra), 3, str(config),
                   "damaged run config", expected)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    assert config.read_bytes() == damage


@pytest.mark.parametrize(("name", "expected"), [
    ("irs", "is a directory"), ("/dev/null", "not a regular file"),
    ("missing.json", "no such file"),
])
def test_library_import_says_what_is_there_instead_of_a_file(ws, tmp_path, name, expected):
    (tmp_path / "irs").mkdir()
    path = tmp_path / name
    before = esper(ws, "--json", "library", "stats").stdout
    one_error_line(esper(ws, "library", "import", str(path)), 2, str(path), expected)
    assert esper(ws, "--json", "library", "stats").stdout == before


def test_library_import_refuses_an_oversized_file_without_reading_it(ws, tmp_path):
    """An 8 GiB (sparse) file, imported by the real `esper` under a 1 GiB address-space limit:
    the size limit is checked on the file's size before a byte is read (before: the whole file
    was read first, here a MemoryError, an internal error)."""
    import resource

    path = tmp_path / "huge.json"
    with path.open("wb") as f:
        f.truncate(8 << 30)
    before = esper(ws, "--json", "library", "stats").stdout

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run([str(Path(sys.executable).parent / "esper"), "--workspace",
                             str(ws.root), "library", "import", str(path)], capture_output=True,
                            text=True, timeout=120, check=False, preexec_fn=limit)
    one_error_line(result, 2, str(path), f"the IR is {8 << 30} bytes; the limit is 1048576")
    assert esper(ws, "--json", "library", "stats").stdout == before


@pytest.mark.parametrize("role", ["forge", "bench"])
@pytest.mark.parametrize("damage", ["garble", "remove"])
def test_library_verify_finds_a_damaged_public_key_before_anything_is_signed(ws, role, damage):
    assert esper(ws, "library", "verify").exit_code == 0  # blueprints only: nothing signed yet
    key = ws.public_key_path(role)
    if damage == "garble":
        key.write_text("not a key\n")
    else:
        key.unlink()
    line = one_error_line(esper(ws, "library", "verify"), 3, f"{role} public key", str(key))
    assert "1 integrity problem" in line


@pytest.mark.parametrize("inside", ["urza.db", "urza.db-wal", "workspace.json", "keys/forge.pub",
                                    "artifacts/blob", "artifacts/new.json", "runs/new.json",
                                    "link to urza.db"])
def test_library_export_refuses_to_write_into_the_workspace_itself(ws, tmp_path, inside):
    blueprint = json.loads(esper(ws, "--json", "library", "list").stdout)[0]["id"]
    files = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()}
    if inside == "artifacts/blob":
        out = next(p for p in files if p.is_relative_to(ws.artifacts_dir))
    elif inside == "link to urza.db":
        out = tmp_path / "branch.json"
        out.symlink_to(ws.db_path)
    else:
        out = ws.root / inside
    one_error_line(esper(ws, "library", "export", blueprint, "-o", str(out)), 2, str(out),
                   "inside the workspace's own files")
    assert {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()} == files
    assert esper(ws, "library", "verify").exit_code == 0


def test_library_export_may_write_beside_the_workspace_files(ws):
    blueprint = json.loads(esper(ws, "--json", "library", "list").stdout)[0]["id"]
    result = esper(ws, "library", "export", blueprint, "-o", str(ws.root / "branch.json"))
    assert result.exit_code == 0, result.output
    assert json.loads((ws.root / "branch.json").read_text())["name"]
