"""One measurement at a time per GPU, and no other gauntlet's GPU work while it runs.

    lock = GpuLock.for_device("cuda:0")      # None on CPU
    with lock.active():                      # context, load, gatekeep: any number at once
        ...
    with lock.measuring():                   # profile: alone on the GPU
        ...
    lock.hold_active_until_exit()            # the child's exit (context teardown) counts too

Why a reader-writer lock and not only an exclusive one around the measurement: on an H100,
graph-replay timings of the same module in fresh processes agree to ~0.3% when no other process
touches the GPU, but move by 5-7% in either direction while other processes create CUDA
contexts, copy a few MB and exit beside them (docs/bench-gauntlet-gpu.md, the interference
probe). Those are exactly the other gauntlet children's start-up, load and exit, which an
exclusive lock around profiling alone did not keep out. Idle contexts do not disturb.

Two files per GPU (named by its UUID, so CUDA_VISIBLE_DEVICES cannot make two names for one chip,
in the temporary directory or ESPER_GPU_LOCK_DIR), `flock`ed:

- the room (`esper-urabrask-gpu-<uuid>.lock`): shared by active holders, exclusive for a
  measurement;
- the turnstile (`...turnstile`): a measurement holds it while it waits for the room, and an
  active holder passes through it before entering, so children that keep starting cannot starve
  a measurement.

The kernel drops a dead holder's locks. A process must never ask to measure while it holds the
room as active (flock locks of two open files conflict even within one process): phases are
sequential, and `hold_active_until_exit` is for the sandboxed child's last act only.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

PREFIX = "esper-urabrask-gpu-"


class GpuLock:
    def __init__(self, folder: str, name: str) -> None:
        self.room = os.path.join(folder, f"{PREFIX}{name}.lock")
        self.turnstile = os.path.join(folder, f"{PREFIX}{name}.turnstile")

    @classmethod
    def for_device(cls, device: str) -> GpuLock | None:
        """The lock of `device`'s GPU, or None for a CPU."""
        if not device.startswith("cuda"):
            return None
        import torch

        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        try:
            name = str(torch.cuda.get_device_properties(index).uuid)
        except (AttributeError, RuntimeError):
            name = f"index{index}"
        return cls(os.environ.get("ESPER_GPU_LOCK_DIR") or tempfile.gettempdir(), name)

    @contextmanager
    def active(self) -> Iterator[None]:
        """GPU work that is not a measurement: shares the GPU with other such work."""
        room = self._enter_shared()
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
            os.close(room)

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Alone on the GPU: waits for active holders to leave, and keeps new ones out."""
        gate, room = self._open(self.turnstile), self._open(self.room)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(room, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)
            os.close(room)
            os.close(gate)

    def hold_active_until_exit(self) -> None:
        """Hold the room as active until this process dies, so that its CUDA context's teardown
        does not land inside another's measurement. A raw descriptor: interpreter shutdown
        closes file objects, not descriptors; the kernel closes it when the process ends."""
        self._enter_shared()

    def _enter_shared(self) -> int:
        gate, room = self._open(self.turnstile), self._open(self.room)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)  # waits while a measurement waits or runs
            fcntl.flock(room, fcntl.LOCK_SH)
        except BaseException:
            os.close(room)
            raise
        finally:
            os.close(gate)  # closing drops the turnstile
        return room

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
