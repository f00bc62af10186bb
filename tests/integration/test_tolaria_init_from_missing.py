"""`model.init_from` that names no saved model is exit 2 naming the config file and the field,
like every other bad value of a run config; the path alone did not say which setting gave it."""

from __future__ import annotations

from tolaria_helpers import write_config
from typer.testing import CliRunner

from esper_cli.main import app


def test_init_from_without_a_saved_model_names_the_field(tmp_path):
    config = write_config(tmp_path / "run.yaml", epochs=1)
    missing = tmp_path / "runs" / "no-such-run"
    result = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "train", str(config),
                                      f"model.init_from={missing}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {config}: field 'model.init_from': {missing}: no "
                                     "saved model (model.safetensors and model.json)")
    assert not (tmp_path / "ws" / "runs").exists()  # nothing half-written
