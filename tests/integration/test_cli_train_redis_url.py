"""`esper --redis-url URL train`: a malformed URL is bad input (exit 2, one line, no run folder);
a well-formed one whose Redis does not answer still trains, without the bus, as it always did."""

from __future__ import annotations

import json

import pytest
import yaml
from tolaria_helpers import tiny_config
from typer.testing import CliRunner

from esper.workspace import Workspace
from esper_cli.main import app


@pytest.fixture
def setup(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.create()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(**{"epochs": 1, "telemetry.bus": True})
                                     .model_dump(mode="json")))
    return ws, config


@pytest.mark.parametrize(("url", "expected"), [
    ("not a url", "the scheme must be redis://, rediss:// or unix://"),
    ("redis://localhost:notaport/0", "bad Redis URL 'redis://localhost:notaport/0'"),
    ("redis://", "no host"),
])
def test_a_malformed_redis_url_is_refused_before_the_run_starts(setup, url, expected):
    ws, config = setup
    for args in (["train", str(config), "--run-id", "bad-url"], ["train", "--resume", "bad-url"]):
        result = CliRunner().invoke(app, ["--workspace", str(ws.root), "--redis-url", url, *args])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: bad Redis URL") and expected in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (ws.root / "runs" / "bad-url").exists()


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://", "no host"),
    ("redis://localhost:notaport/0", "Port could not be cast"),
    ("unix://", "needs the socket's path"),
    ("localhost:6379", "the scheme must be redis://, rediss:// or unix://"),
])
def test_a_malformed_redis_url_in_the_config_is_its_field(setup, url, expected):
    """telemetry.redis_url is checked by the same rule as --redis-url, when the config is read:
    exit 2 naming the file and the field (before: a URL with a scheme but no host or port
    passed, the run trained without a bus and only warned)."""
    ws, config = setup
    data = yaml.safe_load(config.read_text())
    data["telemetry"]["redis_url"] = url
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "train", str(config),
                                      "--run-id", "bad-url"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {config}: ") and "field 'telemetry.redis_url'" in line
    assert expected in line and "internal error" not in line
    assert not (ws.root / "runs" / "bad-url").exists()


def test_an_unreachable_redis_still_trains_without_the_bus(setup):
    ws, config = setup
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "--json", "--redis-url",
                                      "redis://127.0.0.1:1/0", "train", str(config)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["epochs"] == 1
