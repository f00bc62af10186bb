"""Tamiyo: the controller that decides when, where and with which kernel a model grows
(DESIGN.md section 11).

    tamiyo = TamiyoController(model, TamiyoConfig(), urza=urza, run_id=run_id)
    signal = tamiyo.step(build_state_packet(run_id, epoch, health, validation_loss=...), health)

Importing this package imports neither torch nor numpy: the controller and the packet helpers
load on first use, so that `esper.config` can validate a `tamiyo:` section cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.kernels import (
    FixedKernelChooser,
    KernelCandidate,
    KernelChooser,
    UrzaKernelChooser,
)

if TYPE_CHECKING:
    from esper.tamiyo.controller import TamiyoController
    from esper.tamiyo.packets import build_state_packet

__all__ = ["FixedKernelChooser", "KernelCandidate", "KernelChooser", "TamiyoConfig",
           "TamiyoController", "UrzaKernelChooser", "build_state_packet"]

_LAZY = {"TamiyoController": "esper.tamiyo.controller", "build_state_packet": "esper.tamiyo.packets"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'esper.tamiyo' has no attribute {name!r}")
