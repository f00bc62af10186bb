"""Kasmina: the seed execution layer that lives inside the user's model (DESIGN.md section 10).

    model, report = kasmina.wrap(model, {"seeds_per_layer": 4}, kernel_source=loader)
    ...                                   # train; Tamiyo's commands: kasmina.dispatch(model, cmds)
    signals = [l.health_signal(run_id) for l in kasmina.layers(model)]   # one sync per layer
    kasmina.on_epoch_end(model, epoch)    # commands applied atomically at the boundary

Names resolve on first use, so `import kasmina` and `kasmina.config` (what a run's config needs)
do not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Exported name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "BlueprintKernelSource": "kasmina.cache", "KernelCache": "kasmina.cache",
    "KernelSource": "kasmina.cache",
    "KasminaConfig": "kasmina.config",
    "BoundaryReport": "kasmina.layer", "KasminaLayer": "kasmina.layer",
    "SeedIncident": "kasmina.layer",
    "SeedBank": "kasmina.seeds",
    **{name: "kasmina.wrap" for name in (
        "WrapReport", "WrappedLayer", "attach_kernel_source", "dispatch", "host_parameters",
        "layers", "observe_loss", "on_epoch_end", "rollback_requests", "seed_parameters",
        "seeds_disabled", "wrap")},
}
_SUBMODULES = {"cache", "config", "grafting", "kernels", "layer", "lifecycle", "seeds", "state"}

__all__ = [
    "BlueprintKernelSource", "BoundaryReport", "KasminaConfig", "KasminaLayer", "KernelCache",
    "KernelSource", "SeedBank", "SeedIncident", "WrapReport", "WrappedLayer", "attach_kernel_source",
    "dispatch", "host_parameters", "layers", "observe_loss", "on_epoch_end", "rollback_requests",
    "seed_parameters", "seeds_disabled", "wrap",
]
assert sorted(__all__) == sorted(_EXPORTS)


class _Package(types.ModuleType):
    """`kasmina` itself. Importing a submodule makes the import system set it as an attribute
    of the package; for `kasmina.wrap` that would hide the function `wrap` behind the module
    `kasmina/wrap.py`, so a module is never set over an exported name."""

    def __getattr__(self, name: str) -> Any:
        if name in _EXPORTS:
            value = getattr(importlib.import_module(_EXPORTS[name]), name)
        elif name in _SUBMODULES:
            value = importlib.import_module(f"{__name__}.{name}")
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_EXPORTS) | _SUBMODULES)


sys.modules[__name__].__class__ = _Package
