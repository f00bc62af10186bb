"""Triton kernels of the blend and its telemetry, registered with `torch.library.triton_op`.

`_blend_fwd_kernel` writes `out = y + alpha * g` on the chunks that have a blending seed (a copy
elsewhere) and, in the same pass, accumulates per-column sum, sum of squares and dead count of
`out`; with `STORE_OUT=False` and a row step it is the sampled telemetry read of a dormant
layer. `_blend_bwd_kernel` writes `grad_g = alpha * grad_out` on the blending chunks and
accumulates the per-column gradient energy; with `HAS_G=False` and a row step it is the sampled
gradient read. Column partials are reduced to chunks with one small torch sum.

Layout and semantics: see `reference.py`, the ground truth these kernels are tested against.

Importing this module decorates the kernels, and Triton reads TRITON_INTERPRET at decoration
time: import it only through `kasmina.kernels`, which does so on the first Triton call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kasmina.kernels import probe_gradient

# Not yet tuned on a GPU (this module was written on a CPU-only machine); scripts/bench_kasmina.py
# measures what these reach against the device's copy bandwidth.
BLOCK_R = 32
BLOCK_F = 256
NUM_WARPS = 8
PROGRAMS_PER_SM = 4


@triton.jit
def _blend_fwd_kernel(
    y_ptr, g_ptr, out_ptr, col_stats_ptr, slot_alpha_ptr, chunk_slot_ptr,
    rows, features, width, row_step,
    stride_y_row, stride_g_slot, stride_g_row, stride_g_col,
    rows_per_program, dead_threshold,
    HAS_G: tl.constexpr, STORE_OUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < features
    if HAS_G:
        chunk = cols // width
        slot = tl.load(chunk_slot_ptr + chunk, mask=col_mask, other=-1)
        active = (slot >= 0) & col_mask
        safe_slot = tl.maximum(slot, 0).to(tl.int64)
        alpha = tl.load(slot_alpha_ptr + safe_slot, mask=active, other=0.0).to(tl.float32)
        g_cols = safe_slot * stride_g_slot + (cols - chunk * width).to(tl.int64) * stride_g_col

    acc_sum = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_dead = tl.zeros([BLOCK_F], dtype=tl.float32)
    row_start = pid_r * rows_per_program  # in sampled rows
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_mask = r < row_end
        row = r.to(tl.int64) * row_step
        mask = row_mask[:, None] & col_mask[None, :]
        y = tl.load(y_ptr + row[:, None] * stride_y_row + cols[None, :], mask=mask, other=0.0)
        value = y.to(tl.float32)
        if HAS_G:
            g = tl.load(g_ptr + row[:, None] * stride_g_row + g_cols[None, :],
                        mask=mask & active[None, :], other=0.0)
            value = value + alpha[None, :] * g.to(tl.float32)
        if STORE_OUT:
            tl.store(out_ptr + row[:, None] * stride_y_row + cols[None, :],
                     value.to(out_ptr.dtype.element_ty), mask=mask)
        acc_sum += tl.sum(value, axis=0)
        acc_sq += tl.sum(value * value, axis=0)
        acc_dead += tl.sum(((tl.abs(value) <= dead_threshold) & mask).to(tl.float32), axis=0)
    tl.atomic_add(col_stats_ptr + cols * 3, acc_sum, mask=col_mask)
    tl.atomic_add(col_stats_ptr + cols * 3 + 1, acc_sq, mask=col_mask)
    tl.atomic_add(col_stats_ptr + cols * 3 + 2, acc_dead, mask=col_mask)


@triton.jit
def _blend_bwd_kernel(
    grad_ptr, grad_g_ptr, col_energy_ptr, slot_alpha_ptr, chunk_slot_ptr,
    rows, features, width, row_step,
    stride_grad_row, stride_gg_slot, stride_gg_row,
    rows_per_program,
    HAS_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < features
    if HAS_G:
        chunk = cols // width
        slot = tl.load(chunk_slot_ptr + chunk, mask=col_mask, other=-1)
        active = (slot >= 0) & col_mask
        safe_slot = tl.maximum(slot, 0).to(tl.int64)
        alpha = tl.load(slot_alpha_ptr + safe_slot, mask=active, other=0.0).to(tl.float32)
        gg_cols = safe_slot * stride_gg_slot + (cols - chunk * width).to(tl.int64)

    acc_energy = tl.zeros([BLOCK_F], dtype=tl.float32)
    row_start = pid_r * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_mask = r < row_end
        row = r.to(tl.int64) * row_step
        mask = row_mask[:, None] & col_mask[None, :]
        grad = tl.load(grad_ptr + row[:, None] * stride_grad_row + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        if HAS_G:
            tl.store(grad_g_ptr + row[:, None] * stride_gg_row + gg_cols[None, :],
                     (alpha[None, :] * grad).to(grad_g_ptr.dtype.element_ty),
                     mask=mask & active[None, :])
        acc_energy += tl.sum(grad * grad, axis=0)
    tl.atomic_add(col_energy_ptr + cols, acc_energy, mask=col_mask)


def _grid(rows: int, features: int, device: torch.device, block_r: int, block_f: int
          ) -> tuple[tuple[int, int], int]:
    """(column tiles, row programs) and rows per program: about PROGRAMS_PER_SM programs per SM."""
    col_tiles = triton.cdiv(features, block_f)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    row_programs = max(1, min(triton.cdiv(rows, block_r), PROGRAMS_PER_SM * sms // col_tiles))
    rows_per_program = triton.cdiv(triton.cdiv(rows, row_programs), block_r) * block_r
    return (col_tiles, triton.cdiv(rows, rows_per_program)), rows_per_program


def _checked_buffer(buffer: torch.Tensor, shape, like: torch.Tensor) -> torch.Tensor:
    if (tuple(buffer.shape) != tuple(shape) or buffer.dtype != like.dtype
            or buffer.device != like.device or not buffer.is_contiguous()):
        raise ValueError(f"output buffer must be a contiguous {like.dtype} tensor of shape "
                         f"{tuple(shape)} on {like.device}, got {tuple(buffer.shape)} "
                         f"{buffer.dtype} on {buffer.device}")
    return buffer


def blend_forward(y: torch.Tensor, g: torch.Tensor, slot_alpha: torch.Tensor,
                  chunk_slot: torch.Tensor, dead_threshold: float, *, block_r: int = BLOCK_R,
                  block_f: int = BLOCK_F, out: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused blend: (out (rows, F), stats (C, 3) float32). `out`, if given, is
    overwritten whole (tests pass one poisoned with NaN)."""
    y = y.contiguous()
    rows, features = y.shape
    chunks = chunk_slot.numel()
    width = features // chunks
    out = torch.empty_like(y) if out is None else _checked_buffer(out, y.shape, y)
    col_stats = torch.zeros(features, 3, device=y.device, dtype=torch.float32)
    has_g = g.shape[0] > 0
    grid, rows_per_program = _grid(rows, features, y.device, block_r, block_f)
    wrap_triton(_blend_fwd_kernel)[grid](
        y, g if has_g else y, out, col_stats, slot_alpha, chunk_slot,
        rows, features, width, 1,
        y.stride(0), g.stride(0) if has_g else 0, g.stride(1) if has_g else 0,
        g.stride(2) if has_g else 0,
        rows_per_program, dead_threshold,
        HAS_G=has_g, STORE_OUT=True, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=NUM_WARPS,
    )
    return out, col_stats.view(chunks, width, 3).sum(dim=1)


def blend_backward(grad_out: torch.Tensor, slot_alpha: torch.Tensor, chunk_slot: torch.Tensor,
                   num_slots: int, *, block_r: int = BLOCK_R, block_f: int = BLOCK_F,
                   grad_g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the blend backward: (grad_g (A, rows, L), energy (C,) float32). `grad_g`, if
    given, is overwritten whole."""
    grad_out = grad_out.contiguous()
    rows, features = grad_out.shape
    chunks = chunk_slot.numel()
    width = features // chunks
    shape = (num_slots, rows, width)
    grad_g = (torch.empty(shape, device=grad_out.device, dtype=grad_out.dtype) if grad_g is None
              else _checked_buffer(grad_g, shape, grad_out))
    col_energy = torch.zeros(features, device=grad_out.device, dtype=torch.float32)
    grid, rows_per_program = _grid(rows, features, grad_out.device, block_r, block_f)
    wrap_triton(_blend_bwd_kernel)[grid](
        grad_out, grad_g if num_slots else grad_out, col_energy, slot_alpha, chunk_slot,
        rows, features, width, 1,
        grad_out.stride(0), rows * width, width,
        rows_per_program,
        HAS_G=num_slots > 0, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=NUM_WARPS,
    )
    return grad_g, col_energy.view(chunks, width).sum(dim=1)


def sampled_stats(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float, *,
                  block_r: int = BLOCK_R, block_f: int = BLOCK_F) -> torch.Tensor:
    """(C, 3) stats of rows 0, row_step, ... of y: the dormant layer's telemetry read."""
    y = y.contiguous()
    rows, features = y.shape
    sampled_rows = triton.cdiv(rows, row_step)
    width = features // chunks
    col_stats = torch.zeros(features, 3, device=y.device, dtype=torch.float32)
    grid, rows_per_program = _grid(sampled_rows, features, y.device, block_r, block_f)
    wrap_triton(_blend_fwd_kernel)[grid](
        y, y, y, col_stats, col_stats, col_stats,
        sampled_rows, features, width, row_step,
        y.stride(0), 0, 0, 0,
        rows_per_program, dead_threshold,
        HAS_G=False, STORE_OUT=False, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=NUM_WARPS,
    )
    return col_stats.view(chunks, width, 3).sum(dim=1)


def sampled_energy(grad: torch.Tensor, chunks: int, row_step: int, *, block_r: int = BLOCK_R,
                   block_f: int = BLOCK_F) -> torch.Tensor:
    """(C,) sum of grad**2 over rows 0, row_step, ...: the dormant layer's gradient read."""
    grad = grad.contiguous()
    rows, features = grad.shape
    sampled_rows = triton.cdiv(rows, row_step)
    width = features // chunks
    col_energy = torch.zeros(features, device=grad.device, dtype=torch.float32)
    grid, rows_per_program = _grid(sampled_rows, features, grad.device, block_r, block_f)
    wrap_triton(_blend_bwd_kernel)[grid](
        grad, grad, col_energy, col_energy, col_energy,
        sampled_rows, features, width, row_step,
        grad.stride(0), 0, 0,
        rows_per_program,
        HAS_G=False, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=NUM_WARPS,
    )
    return col_energy.view(chunks, width).sum(dim=1)


# --- the ops torch.compile sees through ---------------------------------------------------------

@triton_op("kasmina::blend", mutates_args={})
def blend_op(y: torch.Tensor, g: torch.Tensor, slot_alpha: torch.Tensor, chunk_slot: torch.Tensor,
             slot_chunk: torch.Tensor, probe: torch.Tensor | None, dead_threshold: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused blend + telemetry. `probe` (C, 2) float64, unused forward: its gradient is the
    per-chunk (gradient energy, element count) of this call's backward."""
    return blend_forward(y, g, slot_alpha, chunk_slot, dead_threshold)


@triton_op("kasmina::blend_backward", mutates_args={})
def blend_backward_op(grad_out: torch.Tensor, slot_alpha: torch.Tensor, chunk_slot: torch.Tensor,
                      num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    return blend_backward(grad_out, slot_alpha, chunk_slot, num_slots)


@triton_op("kasmina::sampled_stats", mutates_args={})
def sampled_stats_op(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float
                     ) -> torch.Tensor:
    return sampled_stats(y, chunks, row_step, dead_threshold)


@triton_op("kasmina::sampled_energy", mutates_args={})
def sampled_energy_op(grad: torch.Tensor, chunks: int, row_step: int) -> torch.Tensor:
    return sampled_energy(grad, chunks, row_step)


def _blend_setup_context(ctx, inputs, output) -> None:
    y, g, slot_alpha, chunk_slot, slot_chunk, probe, _ = inputs
    ctx.save_for_backward(slot_alpha, chunk_slot)
    ctx.num_slots = g.shape[0]
    ctx.has_probe = probe is not None


def _blend_backward(ctx, grad_out: torch.Tensor, grad_stats: torch.Tensor):
    slot_alpha, chunk_slot = ctx.saved_tensors
    grad_g, energy = torch.ops.kasmina.blend_backward(grad_out, slot_alpha, chunk_slot, ctx.num_slots)
    probe_grad = probe_gradient(energy, grad_out.shape[0] * grad_out.shape[1]) if ctx.has_probe else None
    return grad_out, grad_g, None, None, None, probe_grad, None


blend_op.register_autograd(_blend_backward, setup_context=_blend_setup_context)
