"""The seed state of one layer: one structure-of-arrays on the layer's device (HLD K.3.1).

Control arrays change only at epoch boundaries and are covered by a CRC32 checked at the next
boundary (a mismatch is corrupt state: Kasmina asks Tolaria for a rollback, HLD K.6). Dynamic
arrays (alpha, health accumulators, seed losses, grafting signals) change on the device during
the epoch, with no host sync. Everything is a registered buffer: `.to(device)` moves it and
`state_dict` saves it.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

# name -> dtype of the control arrays, in checksum order.
CONTROL: dict[str, torch.dtype] = {
    "lifecycle": torch.uint8,          # SeedLifecycle.code
    "kernel_slot": torch.int32,        # index into the layer's kernel table, -1 for none
    "embargo": torch.int32,            # epochs before the seed may germinate again
    "epochs_in_stage": torch.int32,    # boundaries passed in the current stage
    "stage_entry_step": torch.int64,   # the layer's training step when the stage was entered
    "strategy": torch.uint8,           # grafting strategy, index into GraftingStrategy
}
# Columns of `health`: forward sums over sampled elements of the layer output, and the
# gradient energy folded in from the telemetry probe.
SUM, SUMSQ, DEAD, COUNT, GRAD_SUMSQ, GRAD_COUNT = range(6)


class SeedState(nn.Module):
    """Per-seed arrays of a layer with `seeds` seeds."""

    def __init__(self, seeds: int) -> None:
        super().__init__()
        self.seeds = seeds
        for name, dtype in CONTROL.items():
            self.register_buffer(name, torch.zeros(seeds, dtype=dtype))
        self.kernel_slot.fill_(-1)
        self.register_buffer("alpha", torch.zeros(seeds, dtype=torch.float32))
        self.register_buffer("health", torch.zeros(seeds, 6, dtype=torch.float64))
        # (loss EMA, first loss) of the isolated TRAINING objective; NaN until measured.
        self.register_buffer("seed_loss", torch.full((seeds, 2), float("nan")))
        # Grafting: the reference value at graft start and the latest measured signal.
        self.register_buffer("graft_ref", torch.full((seeds,), float("nan")))
        self.register_buffer("graft_signal", torch.full((seeds,), float("nan")))
        self.register_buffer("checksum", torch.zeros(1, dtype=torch.int64))
        self.checksum.fill_(checksum(self.empty_control()))

    def _apply(self, fn, recurse=True):
        # Follow the model across devices, never across dtypes: `model.half()` must not turn
        # counts and sums into half floats.
        def same_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(same_dtype, recurse)

    def empty_control(self) -> dict[str, np.ndarray]:
        control = {name: np.zeros(self.seeds, dtype=_np(dtype)) for name, dtype in CONTROL.items()}
        control["kernel_slot"][:] = -1
        return control

    def read_control(self) -> tuple[dict[str, np.ndarray], int]:
        """The control arrays and the stored checksum, in one device-to-host transfer."""
        packed = torch.cat([getattr(self, name).to(torch.int64) for name in CONTROL]
                           + [self.checksum]).cpu().numpy()  # sync: once per boundary
        control = {name: packed[i * self.seeds:(i + 1) * self.seeds].astype(_np(dtype))
                   for i, (name, dtype) in enumerate(CONTROL.items())}
        return control, int(packed[-1])

    def write_control(self, control: dict[str, np.ndarray]) -> None:
        """Store the control arrays and their new checksum on the device."""
        for name, dtype in CONTROL.items():
            getattr(self, name).copy_(torch.from_numpy(np.ascontiguousarray(control[name])).to(dtype))
        self.checksum.fill_(checksum(control))


def checksum(control: dict[str, np.ndarray]) -> int:
    """CRC32 of the control arrays' bytes, in a fixed order and fixed dtypes."""
    crc = 0
    for name, dtype in CONTROL.items():
        crc = zlib.crc32(np.ascontiguousarray(control[name], dtype=_np(dtype)).tobytes(), crc)
    return crc


def _np(dtype: torch.dtype) -> np.dtype:
    return {torch.uint8: np.uint8, torch.int32: np.int32, torch.int64: np.int64}[dtype]
