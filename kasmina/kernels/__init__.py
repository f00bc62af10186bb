"""The blend and telemetry kernels, and the choice between Triton and the PyTorch reference.

`backend` "auto" (the default) runs Triton on CUDA tensors and the reference everywhere else;
"triton" forces Triton (tests run it on CPU under TRITON_INTERPRET=1); "reference" forces the
reference. The Triton module is imported on first use: Triton reads TRITON_INTERPRET when it
decorates the kernels, and a CPU-only run never needs it.

Gradient energy reaches the layer as the gradient of a *probe*: a (C, 2) float64 leaf that the
forward ignores and whose gradient is (sum of grad**2, elements) per chunk, so autograd
accumulates it across backward passes with no side effect inside a backward formula (which
`torch.compile` could not trace).

`torch.compile` sees the Triton kernels as the ops registered in `blend.py`
(`torch.ops.kasmina.*`). Eager code calls their launchers directly: the same kernels with the
same arguments, so the same bits, without the registered op's Python dispatch (its autograd
wrapper, argument defaults, alias checks), which cost ~0.6 ms of host time per blending layer
per step on the H100 host (docs/bench-train.md), against a 14 ms step. It calls them with
`wrap_triton` off, as the registered ops' eager bodies run: a launch then goes straight to the
Triton kernel, where under `wrap_triton` it went through a higher-order op's tracing machinery
(pytrees, signature binding): 1.2 ms of host time per launch on the H100 host under cProfile,
0.13 ms of it Triton's own launch (scripts/bench_seed_step.py --profile), for launches that need
no tracing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

try:  # torch's private switch (what triton_op's eager bodies use); absent: launches stay wrapped
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # pragma: no cover - a torch without it: same kernels, more host time
    from contextlib import nullcontext

    def set_wrap_triton_enabled(enabled: bool):
        return nullcontext()

from kasmina.kernels import reference

Backend = Literal["auto", "triton", "reference"]
_backend: Backend = "auto"


@contextmanager
def backend(name: Backend) -> Iterator[None]:
    """Run the kernels on `name` inside the block."""
    global _backend
    if name not in ("auto", "triton", "reference"):
        raise ValueError(f"unknown kernel backend {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def uses_triton(t: torch.Tensor) -> bool:
    return _backend == "triton" or (_backend == "auto" and t.is_cuda)


def _ops():
    from kasmina.kernels import blend  # noqa: F401  (registers torch.ops.kasmina.*)

    return torch.ops.kasmina


def _launchers():
    """The Triton launchers, or None while torch.compile traces (it needs the registered ops)."""
    if torch.compiler.is_compiling():
        return None
    from kasmina.kernels import blend

    return blend


def _eager(launcher, *args):
    """`launcher(*args)` with `wrap_triton` off: the kernels launched directly (real tensors)."""
    with set_wrap_triton_enabled(False):
        return launcher(*args)


def probe_gradient(energy: torch.Tensor, elements: int) -> torch.Tensor:
    """(C, 2) float64: the gradient that adds (energy, elements per chunk) to a telemetry probe."""
    per_chunk = float(elements // energy.numel())
    return torch.stack([energy.to(torch.float64),
                        torch.full_like(energy, per_chunk, dtype=torch.float64)], dim=1)


def new_probe(chunks: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.zeros(chunks, 2, dtype=torch.float64, device=device, requires_grad=True)


def blend_chunks(y: torch.Tensor, g: torch.Tensor, slot_alpha: torch.Tensor,
                 chunk_slot: torch.Tensor, slot_chunk: torch.Tensor, probe: torch.Tensor | None,
                 dead_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out = y with alpha_s * g_s added to chunk(s), and (C, 3) telemetry of out. Differentiable
    in y and g; the backward adds the per-chunk gradient energy to `probe.grad`."""
    if uses_triton(y):
        if _launchers() is None:
            return _ops().blend(y, g, slot_alpha, chunk_slot, slot_chunk, probe, dead_threshold)
        return _TritonBlend.apply(y, g, slot_alpha, chunk_slot, slot_chunk, probe, dead_threshold)
    return _ReferenceBlend.apply(y, g, slot_alpha, chunk_slot, slot_chunk, probe, dead_threshold)


def chunk_stats(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float) -> torch.Tensor:
    """(C, 3) float32 sum, sum of squares, dead count of rows 0, row_step, ... of y (no grad)."""
    if uses_triton(y):
        launchers = _launchers()
        if launchers is None:
            return _ops().sampled_stats(y, chunks, row_step, dead_threshold)
        return _eager(launchers.sampled_stats, y, chunks, row_step, dead_threshold)
    return reference.chunk_stats(y, chunks, row_step, dead_threshold)


def accumulate_chunk_stats(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float,
                           health: torch.Tensor, column: int, count: float) -> None:
    """health[:, column:column + 3] += chunk_stats(y, chunks, row_step, dead_threshold) and
    health[:, column + 3] += count (`health`: contiguous float64, (C, >= column + 4)). On the
    Triton path one read and one small summing kernel, instead of the read, a sum and two adds."""
    if uses_triton(y):
        launchers = _launchers()
        if launchers is None:
            _ops().accumulate_sampled_stats(y, chunks, row_step, dead_threshold, health, column, float(count))
        else:
            _eager(launchers.accumulate_sampled_stats, y, chunks, row_step, dead_threshold, health, column,
                   float(count))
        return
    health[:, column:column + 3] += reference.chunk_stats(y, chunks, row_step, dead_threshold)
    health[:, column + 3] += count


def chunk_energy(grad: torch.Tensor, chunks: int, row_step: int) -> torch.Tensor:
    """(C,) float32 sum of grad**2 over rows 0, row_step, ... of grad."""
    if uses_triton(grad):
        launchers = _launchers()
        if launchers is None:
            return _ops().sampled_energy(grad, chunks, row_step)
        return _eager(launchers.sampled_energy, grad, chunks, row_step)
    return reference.chunk_energy(grad, chunks, row_step)


class _ReferenceBlend(torch.autograd.Function):
    """The CPU path: the reference forward and backward under one autograd node."""

    @staticmethod
    def forward(ctx, y, g, slot_alpha, chunk_slot, slot_chunk, probe, dead_threshold):
        out, stats = reference.blend_forward(y, g, slot_alpha, chunk_slot, slot_chunk, dead_threshold)
        ctx.save_for_backward(slot_alpha, chunk_slot, slot_chunk)
        ctx.has_probe = probe is not None
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats):
        slot_alpha, chunk_slot, slot_chunk = ctx.saved_tensors
        grad_g, energy = reference.blend_backward(grad_out, slot_alpha, chunk_slot, slot_chunk)
        probe_grad = probe_gradient(energy, grad_out.numel()) if ctx.has_probe else None
        return grad_out, grad_g, None, None, None, probe_grad, None


class _TritonBlend(torch.autograd.Function):
    """The eager Triton path: `torch.ops.kasmina.blend` and its registered backward
    (`blend._blend_backward`), their launchers called directly under one autograd node."""

    @staticmethod
    def forward(ctx, y, g, slot_alpha, chunk_slot, slot_chunk, probe, dead_threshold):
        from kasmina.kernels import blend

        out, stats = _eager(blend.blend_forward, y, g, slot_alpha, chunk_slot, dead_threshold)
        ctx.save_for_backward(slot_alpha, chunk_slot)
        ctx.num_slots = g.shape[0]
        ctx.has_probe = probe is not None
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats):
        from kasmina.kernels import blend

        slot_alpha, chunk_slot = ctx.saved_tensors
        grad_g, energy = _eager(blend.blend_backward, grad_out, slot_alpha, chunk_slot, ctx.num_slots)
        probe_grad = probe_gradient(energy, grad_out.shape[0] * grad_out.shape[1]) if ctx.has_probe else None
        return grad_out, grad_g, None, None, None, probe_grad, None


class GradientProbe(torch.autograd.Function):
    """Identity on `y` (rows, F) whose backward adds the sampled per-chunk gradient energy to probe.grad:
    the dormant layer's gradient telemetry, with no copy of the output."""

    @staticmethod
    def forward(ctx, y, probe, chunks, row_step):
        ctx.chunks, ctx.row_step = chunks, row_step
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # grad: (rows, F)
        energy = chunk_energy(grad, ctx.chunks, ctx.row_step)
        sampled_rows = -(-grad.shape[0] // ctx.row_step)
        return grad, probe_gradient(energy, sampled_rows * grad.shape[1]), None, None
