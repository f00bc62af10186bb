"""`kasmina.include`, `exclude` and `blocks` patterns that match nothing stop `esper train`
before it writes anything; `kasmina.targets: []` is how a run says "no seeds"; a run an earlier
version started with its spelling of that (`include: ["no-layer"]`) still resumes."""

from __future__ import annotations

import json

import pytest
import yaml
from tolaria_helpers import tiny_config
from typer.testing import CliRunner

import kasmina
from esper.tolaria.run import run_training
from esper_cli.main import app

NO_SEEDS = {"kasmina.targets": [], "kasmina.include": []}
NO_LAYER_NOTICE = "kasmina wrapped no layer"


@pytest.mark.parametrize(("kasmina_config", "expected"), [
    ({"include": ["layers.3"]}, ("field 'kasmina.include': 'layers.3' matches no linear module of "
                                 "the model (it has layers.0, layers.1, head)")),
    ({"exclude": ["haed"]}, "field 'kasmina.exclude': 'haed' matches no module kasmina selects"),
    ({"targets": [], "include": [], "blocks": {"span.*": {"kind": "linear"}}},
     "field 'kasmina.blocks': 'span.*' matches no module of the model"),
], ids=["include", "exclude", "blocks"])
def test_a_kasmina_pattern_that_matches_nothing_exits_2_and_leaves_no_run(ws, tmp_path,
                                                                        kasmina_config, expected):
    config = tiny_config(epochs=1).model_dump(mode="json")
    config["kasmina"].update(kasmina_config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "train", str(path),
                                      "--run-id", "mine"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: {expected}"), line  # the file, then the field
    assert not (ws.runs_dir / "mine").exists()


def test_empty_targets_train_without_seeds_and_without_the_no_layer_notice(tmp_path):
    """`targets: []` asked for no seeds: nothing to warn about. Targets the model has none of
    (an MLP has no conv2d) wrap no layer either, and that is said."""
    bare = run_training(tiny_config(epochs=1, out_dir=str(tmp_path), **NO_SEEDS))
    assert kasmina.layers(bare.model) == [] and bare.status == "completed"
    assert not any(NO_LAYER_NOTICE in n for n in bare.history.notices), bare.history.notices
    conv = run_training(tiny_config(**{"epochs": 1, "out_dir": str(tmp_path), "name": "conv",
                                       "kasmina.targets": ["conv2d"], "kasmina.include": []}))
    assert kasmina.layers(conv.model) == []
    assert any(NO_LAYER_NOTICE in n for n in conv.history.notices), conv.history.notices


def test_a_run_saved_with_the_old_no_layer_spelling_resumes(tmp_path):
    """A run an earlier version started with `include: ["no-layer"]` (how it said "no seeds")
    resumes: its saved config is not checked against the model again."""
    def interrupt(event):
        if event.kind == "step" and event.epoch == 2 and event.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(epochs=3, out_dir=str(tmp_path), **NO_SEEDS), run_id="old",
                     progress=interrupt)
    saved = tmp_path / "old" / "config.json"
    data = json.loads(saved.read_text())
    data["kasmina"].update(targets=["linear"], include=["no-layer"])  # as an earlier version wrote it
    saved.write_text(json.dumps(data))
    resumed = run_training(None, resume=tmp_path / "old")
    assert resumed.status == "completed" and resumed.summary["epochs"] == 3
    assert kasmina.layers(resumed.model) == []
