"""Tolaria: `esper train`, the training loop that hosts Kasmina's seeds and obeys Tamiyo
(DESIGN.md section 12).

- `esper.tolaria.config`: TrainConfig and `load_config` (the run's YAML, strict, overrides).
- `esper.tolaria.models`: the built-in model zoo and `build_model`.
- `esper.tolaria.data`: built-in data sets needing no download, `build_data`, `make_loaders`.
- `esper.tolaria.trainer`: TolariaTrainer, the epoch loop and its end-of-epoch hook.
- `esper.tolaria.run`: `run_training`, what `esper train` does (build, wrap, register, train).
- `esper.tolaria.optim`: the optimizer, its state-keeping rebuild, the lr schedule.
- `esper.tolaria.checkpoint`: atomic safetensors + JSON checkpoints, RNG and optimizer state.
- `esper.tolaria.events`: the run's bus (non-blocking publish, `control.run` listener).
- `esper.tolaria.export`: `save_model`, `load_model`, the run's lineage.
"""
