"""The SDK of HLD 9.3.1, as its example reads: load a config, wrap a model, make the controller
and the trainer, train, save. Without a workspace, kernels come from the blueprint builder
(`kasmina.BlueprintKernelSource`) and Tamiyo chooses among them (`FixedKernelChooser`)."""

from __future__ import annotations

import torch
import yaml
from tolaria_helpers import tiny_config

import esper
import kasmina
from esper.blueprints import standard_library
from esper.contracts import SeedLifecycle as S
from esper.tamiyo import FixedKernelChooser
from esper.tolaria.data import build_data
from esper.tolaria.export import read_lineage
from esper.tolaria.models import MLP


def test_the_sdk_example_trains_grows_and_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))

    # 1. Load configurations for each component from YAML files
    config = esper.load_config("run.yaml")
    # 2. Instantiate the host model and wrap it for morphogenesis
    data = build_data(config.data, seed=config.data_seed)
    torch.manual_seed(config.seed)
    model = MLP(data.input_shape, data.out_dim, widths=(32, 32))
    source = kasmina.BlueprintKernelSource()
    morphable_model, report = esper.wrap(model, config.kasmina, kernel_source=source)
    ir = next(ir for ir in standard_library() if ir.name == "mlp_gelu_w8")
    source.add(ir, report.layers[0].interface)
    # 3. Instantiate the controller and trainer
    tamiyo_controller = esper.TamiyoController(
        morphable_model, config.tamiyo, kernel_chooser=FixedKernelChooser.from_entries(source.entries))
    tolaria_trainer = esper.TolariaTrainer(morphable_model, tamiyo_controller, config.tolaria)
    # 4. Start the training and evolution process
    final_model, training_history = tolaria_trainer.train()
    # 5. Save the final, evolved model and its lineage
    esper.save_model(final_model, "./outputs/evolved_mlp")

    assert training_history.status == "completed" and len(training_history.epochs) == config.epochs
    assert (tmp_path / "runs" / training_history.run_id / "metrics.jsonl").is_file()
    (adaptation,) = training_history.lineage["adaptations"]
    assert "audit" not in adaptation  # no workspace, no catalog to cite
    lineage = read_lineage(tmp_path / "outputs" / "evolved_mlp" / "lineage.json")  # its shape
    assert lineage["adaptations"][0]["kernel_artifact_id"] == adaptation["kernel_artifact_id"]
    loaded = esper.load_model("./outputs/evolved_mlp",
                              host=MLP(data.input_shape, data.out_dim, widths=(32, 32)))
    assert S.FOSSILIZED in kasmina.layers(loaded)[0].stages
    x = torch.randn(5, 2)
    assert torch.equal(loaded(x), final_model.eval()(x))
