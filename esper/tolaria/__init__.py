"""Tolaria: `esper train`, the training loop that hosts Kasmina's seeds and obeys Tamiyo
(DESIGN.md section 12).

- `esper.tolaria.config`: TrainConfig and `load_config` (the run's YAML, strict, overrides).
- `esper.tolaria.models`: the built-in model zoo and `build_model`.
- `esper.tolaria.data`: built-in data sets needing no download, `build_data`, `make_loaders`.
"""
