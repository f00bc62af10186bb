"""Esper's SDK (HLD 9.3.1): the importable side of the `esper` command line.

Names resolve lazily, so `import esper` stays cheap and does not import torch:

    import esper
    model, report = esper.wrap(model, config)   # kasmina.wrap
"""

from __future__ import annotations

import importlib
from typing import Any

# SDK name -> "module:attribute". Only what is built is listed.
_EXPORTS: dict[str, str] = {
    "wrap": "kasmina.wrap:wrap",
    "TamiyoController": "esper.tamiyo:TamiyoController",
    "load_config": "esper.config:load_config",
    "TolariaTrainer": "esper.tolaria.trainer:TolariaTrainer",
    "save_model": "esper.tolaria.export:save_model",
    "load_model": "esper.tolaria.export:load_model",
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name].split(":")
    except KeyError:
        raise AttributeError(f"module 'esper' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
