"""`esper.config`: the run config of `esper train` (DESIGN.md section 12); `esper.load_config`.

    config = esper.config.load_config("configs/quickstart.yaml", overrides=["epochs=2"])

The schema and the loader live beside the trainer that reads them, in `esper.tolaria.config`;
this module names them where the SDK promises them. The names resolve on first use, so that
importing `esper.config` stays cheap (the schema imports Kasmina's, and with it torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = ("TrainConfig", "load_config")


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'esper.config' has no attribute {name!r}")
    return getattr(importlib.import_module("esper.tolaria.config"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
