"""Triton kernels of the blend and its telemetry, registered with `torch.library.triton_op`.

`_blend_fwd_kernel` writes `out = y + alpha * g` on the chunks that have a blending seed (a copy
elsewhere) and, in the same pass, sums per chunk the sum, sum of squares and dead count of
`out`; with `STORE_OUT=False` and `SAMPLED=True` it is the row-sampled telemetry read of a
dormant layer. `_blend_bwd_kernel` writes `grad_g = alpha * grad_out` on the blending chunks and
sums per chunk the gradient energy; with `HAS_G=False` and `SAMPLED=True` it is the sampled
gradient read.

Tiles are chunk-aligned: a program owns BLOCK_R rows x (BLOCK_C chunks of BLOCK_W columns), a 2D
tile whose column index splits by constexpr powers of two into chunk and column inside the chunk,
so each chunk's slot and alpha are fixed per program and the column addresses of `y` and `g` are
contiguous runs the compiler vectorizes (`g` is indexed by slot, `y` by chunk). A chunk wider
than the tile spans several width tiles (BLOCK_C = 1); narrow chunks are packed BLOCK_C to a
tile; widths that are not a power of two are masked. Rows stay inside a thread when the tile is
wide enough (BLOCK_F >= 32 * num_warps * elements per 16 bytes), so the per-column sums need no
barrier inside the row loop. (3D tiles compiled to up to 255 registers, spills and in-loop
barriers under Triton 3.6, the version on the bench machine.) Each
program writes its per-chunk partial sums to a scratch buffer (no atomics, so the telemetry is
deterministic), which one small torch sum reduces to (C, 3).

Layout and semantics: see `reference.py`, the ground truth these kernels are tested against.

Importing this module decorates the kernels, and Triton reads TRITON_INTERPRET at decoration
time: import it only through `kasmina.kernels`, which does so on the first Triton call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kasmina.kernels import probe_gradient


@dataclass(frozen=True)
class Tiles:
    """A launch shape: tiles of `block_r` rows x `block_f` columns (`block_f` is split into
    chunks x columns per chunk at launch), `num_warps`, and `programs_per_sm`: that many programs
    per SM share the rows, each looping over its row range; None gives each row tile its own
    program."""

    block_r: int
    block_f: int
    num_warps: int
    programs_per_sm: int | None = None


# Default tiles by kernel and element size in bytes (2 covers bfloat16 and float16); the sampled
# reads use the forward and backward kernels' tiles. Chosen from the sweep of
# `scripts/bench_kasmina.py --adopt-best` at 16384x4096, 64 chunks, every candidate captured in a
# CUDA graph and the candidates replayed in turn 15 times (medians), on an H100 (torch 2.11,
# triton 3.6; docs/bench-kasmina.md, run 5); each figure is that sweep's, as a share of the copy
# bandwidth measured in the same run (run 6, on another H100 with these defaults: 95.1%, 90.1%,
# 90.6%, 84.9%). A tile keeps its rows inside a thread only if BLOCK_F >= 32 * num_warps *
# (16 bytes / element size); bf16 tiles that break this (BLOCK_F=1024 with 8 warps, 512 with 4)
# fell to 56-79% there, and BLOCK_R=32 x 1024 with 4 warps (256 elements per thread) to 46%.
TILES = {
    # 275.2 us = 96.5% of copy (3031 GB/s), fp32
    ("forward", 4): Tiles(block_r=16, block_f=512, num_warps=4),
    # 194.3 us = 91.1% of copy, fp32
    ("backward", 4): Tiles(block_r=8, block_f=1024, num_warps=8, programs_per_sm=8),
    # 147.0 us = 91.6% of copy (2993 GB/s), bf16
    ("forward", 2): Tiles(block_r=16, block_f=1024, num_warps=4),
    # 103.3 us = 86.9% of copy, bf16
    ("backward", 2): Tiles(block_r=16, block_f=1024, num_warps=4, programs_per_sm=8),
}


def default_tiles(kernel: str, dtype: torch.dtype) -> Tiles:
    """The tuned tiles of `kernel` ("forward" or "backward") for `dtype`."""
    return TILES.get((kernel, dtype.itemsize), TILES[(kernel, 4)])


@triton.jit
def _tile_columns(pid, chunks, width, chunk_groups, width_tiles, EVEN_C: tl.constexpr,
                  EVEN_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's row block and its BLOCK_C * BLOCK_W columns: chunk, column inside the
    chunk, column of the (rows, F) matrix, and the mask of real columns."""
    pid_w = pid % width_tiles
    pid_c = (pid // width_tiles) % chunk_groups
    pid_r = pid // (width_tiles * chunk_groups)
    f = tl.arange(0, BLOCK_C * BLOCK_W)
    c = pid_c * BLOCK_C + f // BLOCK_W  # constant over runs of BLOCK_W columns
    w = pid_w * BLOCK_W + f % BLOCK_W  # contiguous over runs of BLOCK_W columns
    if EVEN_C and EVEN_W:
        col_mask = f < BLOCK_C * BLOCK_W
    elif EVEN_C:
        col_mask = w < width
    elif EVEN_W:
        col_mask = c < chunks
    else:
        col_mask = (c < chunks) & (w < width)
    return pid_r, pid_w, c, w, c * width + w, col_mask


@triton.jit
def _row_block(r0, row_end, row_step, SAMPLED: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of this program's (sampled) rows: their row of the (rows, F)
    matrix, as int64 offsets, and the mask of those before `row_end`."""
    r = r0 + tl.arange(0, BLOCK_R)
    row = r.to(tl.int64)
    if SAMPLED:
        row = row * row_step
    return row, r < row_end


@triton.jit
def _chunk_slots(chunk_slot_ptr, slot_alpha_ptr, c, col_mask):
    """Per column: the bank slot of its chunk's active seed (0 where none: a safe address), that
    seed's alpha (0.0 where none) and whether a seed is active."""
    slot = tl.load(chunk_slot_ptr + c, mask=col_mask, other=-1)
    active = slot >= 0
    safe_slot = tl.maximum(slot, 0)
    alpha = tl.load(slot_alpha_ptr + safe_slot, mask=active, other=0.0).to(tl.float32)
    return safe_slot.to(tl.int64), alpha, col_mask & active


@triton.jit
def _blend_fwd_kernel(
    y_ptr, g_ptr, out_ptr, partial_ptr, slot_alpha_ptr, chunk_slot_ptr,
    rows, chunks, width, row_step, rows_per_program, chunk_groups, width_tiles,
    stride_y_row, stride_g_slot, stride_g_row, stride_g_col, dead_threshold,
    HAS_G: tl.constexpr, STORE_OUT: tl.constexpr, SAMPLED: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_W: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_r, pid_w, c, w, cols, col_mask = _tile_columns(
        tl.program_id(0), chunks, width, chunk_groups, width_tiles, EVEN_C, EVEN_W, BLOCK_C, BLOCK_W)
    if HAS_G:
        slot, alpha, g_col_mask = _chunk_slots(chunk_slot_ptr, slot_alpha_ptr, c, col_mask)
        g_cols = slot * stride_g_slot + w * stride_g_col

    acc_sum = tl.zeros([BLOCK_C * BLOCK_W], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_C * BLOCK_W], dtype=tl.float32)
    acc_dead = tl.zeros([BLOCK_C * BLOCK_W], dtype=tl.float32)
    row_start = pid_r * rows_per_program  # in (sampled) rows
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        row, row_mask = _row_block(r0, row_end, row_step, SAMPLED, BLOCK_R)
        mask = row_mask[:, None] & col_mask[None, :]
        y_offsets = (row * stride_y_row)[:, None] + cols[None, :]
        value = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            g = tl.load(g_ptr + (row * stride_g_row)[:, None] + g_cols[None, :],
                        mask=row_mask[:, None] & g_col_mask[None, :], other=0.0)
            value = value + alpha[None, :] * g.to(tl.float32)
        if STORE_OUT:
            tl.store(out_ptr + y_offsets, value.to(out_ptr.dtype.element_ty), mask=mask)
        acc_sum += tl.sum(value, axis=0)
        acc_sq += tl.sum(value * value, axis=0)
        acc_dead += tl.sum(((tl.abs(value) <= dead_threshold) & mask).to(tl.float32), axis=0)
    chunk = tl.program_id(0) // width_tiles % chunk_groups * BLOCK_C + tl.arange(0, BLOCK_C)
    partial = partial_ptr + ((pid_r * width_tiles + pid_w) * chunks + chunk) * 3
    chunk_mask = chunk < chunks
    tl.store(partial, tl.sum(tl.reshape(acc_sum, [BLOCK_C, BLOCK_W]), axis=1), mask=chunk_mask)
    tl.store(partial + 1, tl.sum(tl.reshape(acc_sq, [BLOCK_C, BLOCK_W]), axis=1), mask=chunk_mask)
    tl.store(partial + 2, tl.sum(tl.reshape(acc_dead, [BLOCK_C, BLOCK_W]), axis=1), mask=chunk_mask)


@triton.jit
def _blend_bwd_kernel(
    grad_ptr, grad_g_ptr, partial_ptr, slot_alpha_ptr, chunk_slot_ptr,
    rows, chunks, width, row_step, rows_per_program, chunk_groups, width_tiles,
    stride_grad_row, stride_gg_slot, stride_gg_row,
    HAS_G: tl.constexpr, SAMPLED: tl.constexpr, EVEN_C: tl.constexpr, EVEN_W: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_r, pid_w, c, w, cols, col_mask = _tile_columns(
        tl.program_id(0), chunks, width, chunk_groups, width_tiles, EVEN_C, EVEN_W, BLOCK_C, BLOCK_W)
    if HAS_G:
        slot, alpha, gg_col_mask = _chunk_slots(chunk_slot_ptr, slot_alpha_ptr, c, col_mask)
        gg_cols = slot * stride_gg_slot + w

    acc_energy = tl.zeros([BLOCK_C * BLOCK_W], dtype=tl.float32)
    row_start = pid_r * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        row, row_mask = _row_block(r0, row_end, row_step, SAMPLED, BLOCK_R)
        mask = row_mask[:, None] & col_mask[None, :]
        grad = tl.load(grad_ptr + (row * stride_grad_row)[:, None] + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        if HAS_G:
            tl.store(grad_g_ptr + (row * stride_gg_row)[:, None] + gg_cols[None, :],
                     (alpha[None, :] * grad).to(grad_g_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & gg_col_mask[None, :])
        acc_energy += tl.sum(grad * grad, axis=0)
    chunk = tl.program_id(0) // width_tiles % chunk_groups * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(partial_ptr + (pid_r * width_tiles + pid_w) * chunks + chunk,
             tl.sum(tl.reshape(acc_energy, [BLOCK_C, BLOCK_W]), axis=1), mask=chunk < chunks)


@triton.jit
def _accumulate_kernel(partial_ptr, health_ptr, programs, n, stride_health, column, count,
                       COLUMNS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """`partial` (programs, n) float32, n = chunks * COLUMNS chunk-major: health[c, column + k] +=
    the sum over programs of partial[:, c * COLUMNS + k], in float64 and a fixed order (no
    atomics), and health[c, column + COLUMNS] += count. Rows of `partial` are read whole
    (coalesced), BLOCK_P at a time."""
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = j < n
    acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    for p0 in range(0, programs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        values = tl.load(partial_ptr + p.to(tl.int64)[:, None] * n + j[None, :],
                         mask=(p < programs)[:, None] & j_mask[None, :], other=0.0)
        acc += tl.sum(values.to(tl.float64), axis=0)
    chunk_row = health_ptr + (j // COLUMNS).to(tl.int64) * stride_health + column
    k = j % COLUMNS
    tl.store(chunk_row + k, tl.load(chunk_row + k, mask=j_mask) + acc, mask=j_mask)
    first = j_mask & (k == 0)  # one element per chunk adds the count
    tl.store(chunk_row + COLUMNS, tl.load(chunk_row + COLUMNS, mask=first) + count, mask=first)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@dataclass(frozen=True)
class _Launch:
    grid: tuple[int]
    row_programs: int
    rows_per_program: int
    chunk_groups: int
    width_tiles: int
    meta: dict


@functools.lru_cache(maxsize=1024)
def _launch(rows: int, chunks: int, width: int, device: torch.device, tiles: Tiles) -> _Launch:
    """Split the columns into chunk-aligned tiles and the rows among programs (cached: the
    layer calls with the same few shapes every step)."""
    block_w = min(triton.next_power_of_2(width), tiles.block_f)
    block_c = min(max(1, tiles.block_f // block_w), triton.next_power_of_2(chunks))
    chunk_groups, width_tiles = triton.cdiv(chunks, block_c), triton.cdiv(width, block_w)
    col_tiles = chunk_groups * width_tiles
    row_tiles = max(1, triton.cdiv(rows, tiles.block_r))  # rows == 0: an empty grid below
    if tiles.programs_per_sm is None:
        row_programs = row_tiles
    else:
        row_programs = max(1, min(row_tiles, tiles.programs_per_sm * _sm_count(device) // col_tiles))
    rows_per_program = triton.cdiv(row_tiles, row_programs) * tiles.block_r
    row_programs = triton.cdiv(rows, rows_per_program)
    meta = {"EVEN_C": chunks % block_c == 0, "EVEN_W": width % block_w == 0,
            "BLOCK_R": tiles.block_r, "BLOCK_C": block_c, "BLOCK_W": block_w,
            "num_warps": tiles.num_warps}
    return _Launch((row_programs * col_tiles,), row_programs, rows_per_program, chunk_groups,
                   width_tiles, meta)


def _checked_buffer(buffer: torch.Tensor, shape, like: torch.Tensor) -> torch.Tensor:
    if (tuple(buffer.shape) != tuple(shape) or buffer.dtype != like.dtype
            or buffer.device != like.device or not buffer.is_contiguous()):
        raise ValueError(f"output buffer must be a contiguous {like.dtype} tensor of shape "
                         f"{tuple(shape)} on {like.device}, got {tuple(buffer.shape)} "
                         f"{buffer.dtype} on {buffer.device}")
    return buffer


def _stats_partials(launch: _Launch, chunks: int, device: torch.device) -> torch.Tensor:
    return torch.empty(launch.row_programs * launch.width_tiles, chunks, 3, device=device,
                       dtype=torch.float32)


def blend_forward(y: torch.Tensor, g: torch.Tensor, slot_alpha: torch.Tensor,
                  chunk_slot: torch.Tensor, dead_threshold: float, *, tiles: Tiles | None = None,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused blend: (out (rows, F), stats (C, 3) float32). `out`, if given, is
    overwritten whole (tests pass one poisoned with NaN)."""
    y = y.contiguous()
    rows, features = y.shape
    chunks = chunk_slot.numel()
    width = features // chunks
    out = torch.empty_like(y) if out is None else _checked_buffer(out, y.shape, y)
    launch = _launch(rows, chunks, width, y.device, tiles or default_tiles("forward", y.dtype))
    partials = _stats_partials(launch, chunks, y.device)
    has_g = g.shape[0] > 0
    if rows:
        wrap_triton(_blend_fwd_kernel)[launch.grid](
            y, g if has_g else y, out, partials, slot_alpha, chunk_slot,
            rows, chunks, width, 1, launch.rows_per_program, launch.chunk_groups,
            launch.width_tiles,
            y.stride(0), g.stride(0) if has_g else 0, g.stride(1) if has_g else 0,
            g.stride(2) if has_g else 0, dead_threshold,
            HAS_G=has_g, STORE_OUT=True, SAMPLED=False, **launch.meta,
        )
    return out, partials.sum(dim=0)


def blend_backward(grad_out: torch.Tensor, slot_alpha: torch.Tensor, chunk_slot: torch.Tensor,
                   num_slots: int, *, tiles: Tiles | None = None,
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
    launch = _launch(rows, chunks, width, grad_out.device, tiles or default_tiles("backward", grad_out.dtype))
    partials = torch.empty(launch.row_programs * launch.width_tiles, chunks,
                           device=grad_out.device, dtype=torch.float32)
    if rows:
        wrap_triton(_blend_bwd_kernel)[launch.grid](
            grad_out, grad_g if num_slots else grad_out, partials, slot_alpha, chunk_slot,
            rows, chunks, width, 1, launch.rows_per_program, launch.chunk_groups,
            launch.width_tiles,
            grad_out.stride(0), rows * width, width,
            HAS_G=num_slots > 0, SAMPLED=False, **launch.meta,
        )
    return grad_g, partials.sum(dim=0)


def _sampled_partials(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float,
                      tiles: Tiles | None) -> torch.Tensor:
    """(programs, C, 3) float32 partial stats of rows 0, row_step, ... of y, one row per program
    of the forward kernel's read-only launch (no rows: none)."""
    y = y.contiguous()
    rows, features = y.shape
    sampled_rows = triton.cdiv(rows, row_step)
    width = features // chunks
    launch = _launch(sampled_rows, chunks, width, y.device, tiles or default_tiles("forward", y.dtype))
    partials = _stats_partials(launch, chunks, y.device)
    if not sampled_rows:
        return partials[:0]
    wrap_triton(_blend_fwd_kernel)[launch.grid](
        y, y, y, partials, partials, partials,
        sampled_rows, chunks, width, row_step, launch.rows_per_program, launch.chunk_groups,
        launch.width_tiles,
        y.stride(0), 0, 0, 0, dead_threshold,
        HAS_G=False, STORE_OUT=False, SAMPLED=row_step != 1, **launch.meta,
    )
    return partials


def sampled_stats(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float, *,
                  tiles: Tiles | None = None) -> torch.Tensor:
    """(C, 3) stats of rows 0, row_step, ... of y: the dormant layer's telemetry read."""
    return _sampled_partials(y, chunks, row_step, dead_threshold, tiles).sum(dim=0)


def accumulate_sampled_stats(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float,
                             health: torch.Tensor, column: int, count: float, *,
                             tiles: Tiles | None = None) -> None:
    """health[:, column:column + 3] += sampled_stats(y, ...) and health[:, column + 3] += count,
    in two launches (the sampled read, then one program per 256 (chunk, statistic) pairs summing
    the read's partials into `health`, a float64 (C, >= column + 4) buffer with unit column
    stride), where a torch sum and two adds took three: the dormant layer's telemetry step."""
    if (health.dtype != torch.float64 or health.device != y.device or health.dim() != 2
            or health.shape[0] != chunks or health.shape[1] < column + 4 or health.stride(1) != 1):
        raise ValueError(f"health must be a float64 ({chunks}, >= {column + 4}) tensor on {y.device} "
                         f"with unit column stride, got {tuple(health.shape)} {health.dtype}")
    partials = _sampled_partials(y, chunks, row_step, dead_threshold, tiles)
    n = chunks * 3
    block_n = min(256, triton.next_power_of_2(n))
    wrap_triton(_accumulate_kernel)[(triton.cdiv(n, block_n),)](
        partials, health, partials.shape[0], n, health.stride(0), column,
        float(count), COLUMNS=3, BLOCK_P=64, BLOCK_N=block_n, num_warps=8,
    )


def sampled_energy(grad: torch.Tensor, chunks: int, row_step: int, *,
                   tiles: Tiles | None = None) -> torch.Tensor:
    """(C,) sum of grad**2 over rows 0, row_step, ...: the dormant layer's gradient read."""
    grad = grad.contiguous()
    rows, features = grad.shape
    sampled_rows = triton.cdiv(rows, row_step)
    width = features // chunks
    launch = _launch(sampled_rows, chunks, width, grad.device,
                     tiles or default_tiles("backward", grad.dtype))
    partials = torch.empty(launch.row_programs * launch.width_tiles, chunks, device=grad.device,
                           dtype=torch.float32)
    if sampled_rows:
        wrap_triton(_blend_bwd_kernel)[launch.grid](
            grad, grad, partials, partials, partials,
            sampled_rows, chunks, width, row_step, launch.rows_per_program, launch.chunk_groups,
            launch.width_tiles,
            grad.stride(0), 0, 0,
            HAS_G=False, SAMPLED=row_step != 1, **launch.meta,
        )
    return partials.sum(dim=0)


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


@triton_op("kasmina::accumulate_sampled_stats", mutates_args={"health"})
def accumulate_sampled_stats_op(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float,
                                health: torch.Tensor, column: int, count: float) -> None:
    accumulate_sampled_stats(y, chunks, row_step, dead_threshold, health, column, count)


@triton_op("kasmina::sampled_energy", mutates_args={})
def sampled_energy_op(grad: torch.Tensor, chunks: int, row_step: int) -> torch.Tensor:
    return sampled_energy(grad, chunks, row_step)


def _blend_setup_context(ctx, inputs, output) -> None:
    _y, g, slot_alpha, chunk_slot, _slot_chunk, probe, _ = inputs
    ctx.save_for_backward(slot_alpha, chunk_slot)
    ctx.num_slots = g.shape[0]
    ctx.has_probe = probe is not None


def _blend_backward(ctx, grad_out: torch.Tensor, grad_stats: torch.Tensor):
    slot_alpha, chunk_slot = ctx.saved_tensors
    grad_g, energy = torch.ops.kasmina.blend_backward(grad_out, slot_alpha, chunk_slot, ctx.num_slots)
    probe_grad = probe_gradient(energy, grad_out.shape[0] * grad_out.shape[1]) if ctx.has_probe else None
    return grad_out, grad_g, None, None, None, probe_grad, None


blend_op.register_autograd(_blend_backward, setup_context=_blend_setup_context)
