"""`esper train` as a user runs it: the real CLI in a subprocess on a workspace holding real,
VALIDATED kernels. A seed grows to FOSSILIZED and `esper library lineage` shows it with its
evidence checked; a run killed with SIGKILL in the middle of an epoch resumes with `--resume` to
the very weights of an uninterrupted run; malformed configs exit 2 naming the field."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tolaria_helpers import (
    esper,
    forged_workspace,
    same_state,
    short_dir,
    signal_mid_epoch,
    tiny_config,
    write_config,
)
from typer.testing import CliRunner

from esper_cli.main import app


@pytest.fixture(scope="module")
def forged():
    root = short_dir("cli-train-")
    ws, kernels = forged_workspace(root)
    yield ws, kernels["mlp_gelu_w8"], root
    shutil.rmtree(root, ignore_errors=True)


def test_a_run_grows_a_seed_and_its_lineage_checks_out(forged):
    ws, kernel, root = forged
    config = write_config(root / "grow.yaml")
    done = esper(ws, "--json", "train", str(config), "--run-id", "grow")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed" and summary["outcomes"] == {"FOSSILIZED": 1}
    assert "epoch 12/12" in done.stderr  # one progress line per epoch when not on a terminal

    lineage = esper(ws, "library", "lineage", "grow")
    assert lineage.returncode == 0, lineage.stderr
    assert kernel in lineage.stdout and "all match" in lineage.stdout
    shown = json.loads(esper(ws, "--json", "library", "lineage", "grow").stdout)
    assert shown["adaptations"][0]["kernel_artifact_id"] == kernel
    assert shown["evidence"] == {"checked": True, "problems": []}

    # A lineage citing an audit row the workspace does not hold is an integrity failure.
    path = Path(summary["outputs"]["lineage.json"])
    record = json.loads(path.read_text())
    record["adaptations"][0]["audit"][0]["row_hash"] = "0" * 64
    path.write_text(json.dumps(record))
    forged_lineage = esper(ws, "library", "lineage", "grow")
    assert forged_lineage.returncode == 3 and "hash differs" in forged_lineage.stderr


def test_a_graft_that_misses_its_gate_is_culled_through_the_cli(forged):
    ws, kernel, root = forged
    config = write_config(root / "cull.yaml")
    done = esper(ws, "--json", "train", str(config), "tamiyo.gates.keep_min_improvement=100",
                 "tamiyo.gates.max_evaluation_epochs=1", "--run-id", "culled")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["outcomes"] == {"CULLED": 1} and summary["fossilized"] == 0
    assert summary["parameters"] == summary["host_parameters"]  # nothing of the graft is left
    shown = json.loads(esper(ws, "--json", "library", "lineage", "culled").stdout)
    assert shown["adaptations"] == []
    (outcome,) = shown["other_outcomes"]
    assert outcome["outcome"] == "CULLED" and outcome["kernel_artifact_id"] == kernel


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(forged):
    ws, _, root = forged
    # 40 steps an epoch, so that a kill lands inside one.
    config = write_config(root / "long.yaml", **{"data.kwargs": {"n_samples": 3200}})
    whole = esper(ws, "train", str(config), "--run-id", "whole")
    assert whole.returncode == 0, whole.stderr

    signal_mid_epoch(ws, config, "killed", signal.SIGKILL)
    metrics = ws.root / "runs" / "killed" / "metrics.jsonl"
    reached = len(metrics.read_text().splitlines())
    assert reached < 12, "the run finished before the kill; lengthen it"

    resumed = esper(ws, "train", "--resume", "killed")
    assert resumed.returncode == 0, resumed.stderr
    runs = ws.root / "runs"
    assert same_state(load_file(runs / "whole" / "model.safetensors"),
                      load_file(runs / "killed" / "model.safetensors")) == []
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 13))


def test_resume_with_a_key_value_override_names_the_rule_not_a_missing_file(tmp_path):
    result = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "train", "--resume",
                                      "some-run", "epochs=5"])
    assert result.exit_code == 2
    assert "overrides need a config file" in result.output
    assert "no such config file" not in result.output


@pytest.mark.parametrize(("edit", "overrides", "expected"), [
    ({"optimizer": {"lr": -1}}, [], "field 'optimizer.lr'"),
    ({"optimiser": {"lr": 0.1}}, [], "field 'optimiser'"),
    ({"epochs": "many"}, [], "field 'epochs'"),
    ({}, ["tamiyo.plateau.patiense=3"], "tamiyo.plateau.patiense"),
    ({"model": {"name": "no_such_model"}}, [], "model"),
])
def test_malformed_configs_exit_2_naming_the_field(tmp_path, edit, overrides, expected):
    data = tiny_config().model_dump(mode="json")
    for key, value in edit.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "train", str(config),
                                      *overrides])
    assert result.exit_code == 2, result.output
    assert "bad.yaml" in result.output and expected in result.output
    assert not (tmp_path / "ws" / "runs").exists()  # nothing half-written


def test_unreadable_inputs_exit_2(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {name: mlp\ndata: two_spirals\n")
    runner = CliRunner()
    for args, expected in [(["train", str(broken)], "broken.yaml"),
                           (["train", str(tmp_path / "missing.yaml")], "missing.yaml"),
                           (["train", "--resume", "nope"], "nope"),
                           (["train"], "give a config file")]:
        result = runner.invoke(app, ["--workspace", str(tmp_path / "ws"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)


pytestmark = pytest.mark.timeout(300)
