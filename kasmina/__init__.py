"""Kasmina: the seed execution layer that lives inside the user's model (DESIGN.md section 10).

    model, report = kasmina.wrap(model, {"seeds_per_layer": 4}, kernel_source=loader)
    ...                                   # train; Tamiyo's commands: kasmina.dispatch(model, cmds)
    signals = [l.health_signal(run_id) for l in kasmina.layers(model)]   # one sync per layer
    kasmina.on_epoch_end(model, epoch)    # commands applied atomically at the boundary
"""

from kasmina.cache import BlueprintKernelSource, KernelCache, KernelSource
from kasmina.config import KasminaConfig
from kasmina.layer import BoundaryReport, KasminaLayer, SeedIncident
from kasmina.seeds import SeedBank
from kasmina.wrap import (
    WrappedLayer,
    WrapReport,
    attach_kernel_source,
    dispatch,
    host_parameters,
    layers,
    observe_loss,
    on_epoch_end,
    rollback_requests,
    seed_parameters,
    seeds_disabled,
    wrap,
)

__all__ = [
    "BlueprintKernelSource", "BoundaryReport", "KasminaConfig", "KasminaLayer", "KernelCache",
    "KernelSource", "SeedBank", "SeedIncident", "WrapReport", "WrappedLayer", "attach_kernel_source",
    "dispatch", "host_parameters", "layers", "observe_loss", "on_epoch_end", "rollback_requests",
    "seed_parameters", "seeds_disabled", "wrap",
]
