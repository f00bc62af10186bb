"""Plain-PyTorch reference of the blend and telemetry kernels: the ground truth in tests and
the path every CPU tensor takes.

Layout shared with the Triton kernels in `blend.py`:

- `y`, `out`, `grad_out`: (rows, F), the host output flattened so that each row holds every
  chunk and chunk `c` is the contiguous column range `[c * L, (c + 1) * L)`, `L = F // chunks`
  (linear hosts: rows = leading dims, L = chunk width; conv hosts: rows = batch,
  L = chunk channels * H * W).
- `g`: (A, rows, L), the outputs of the A blending seeds (any strides; a stride of 0 on the
  slot dimension is allowed).
- `slot_alpha` (A,): alpha of each slot; `slot_chunk` (A,) int64: the chunk each slot writes;
  `chunk_slot` (C,) int32: the inverse map, -1 for chunks without a blending seed.
- `stats` (C, 3) float32: per-chunk sum, sum of squares and count of |v| <= dead_threshold of
  the blended output, accumulated in float32 before the output is rounded to its dtype.
"""

from __future__ import annotations

import torch


def blend_forward(y: torch.Tensor, g: torch.Tensor, slot_alpha: torch.Tensor,
                  chunk_slot: torch.Tensor, slot_chunk: torch.Tensor,
                  dead_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out[:, chunk(s)] = y[:, chunk(s)] + alpha_s * g_s, and the per-chunk stats of out."""
    rows, features = y.shape
    chunks = chunk_slot.numel()
    width = features // chunks
    out = y.to(torch.float32).reshape(rows, chunks, width).clone()  # (rows, chunks, L)
    if g.shape[0]:
        contribution = slot_alpha.to(torch.float32)[:, None, None] * g.to(torch.float32)
        out.index_add_(1, slot_chunk, contribution.transpose(0, 1))  # (rows, A, L) into chunks
    stats = _stats(out, dead_threshold)
    return out.reshape(rows, features).to(y.dtype), stats


def blend_backward(grad_out: torch.Tensor, slot_alpha: torch.Tensor, chunk_slot: torch.Tensor,
                   slot_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_g[s] = alpha_s * grad_out[:, chunk(s)], and the per-chunk sum of grad_out**2.

    The gradient for `y` is `grad_out` itself (the blend adds to y), so it is not computed.
    """
    rows, features = grad_out.shape
    chunks = chunk_slot.numel()
    width = features // chunks
    grad = grad_out.to(torch.float32).reshape(rows, chunks, width)  # (rows, chunks, L)
    grad_g = slot_alpha.to(torch.float32)[:, None, None] * grad.index_select(1, slot_chunk).transpose(0, 1)
    energy = grad.square().sum(dim=0).sum(dim=-1)
    return grad_g.to(grad_out.dtype), energy


def chunk_stats(y: torch.Tensor, chunks: int, row_step: int, dead_threshold: float) -> torch.Tensor:
    """The (C, 3) stats of `y` over rows 0, row_step, 2 * row_step, ... (a row subsample)."""
    _rows, features = y.shape
    sampled = y[::row_step].to(torch.float32).reshape(-1, chunks, features // chunks)
    return _stats(sampled, dead_threshold)


def chunk_energy(grad: torch.Tensor, chunks: int, row_step: int) -> torch.Tensor:
    """Per-chunk sum of grad**2 over rows 0, row_step, 2 * row_step, ..."""
    _rows, features = grad.shape
    sampled = grad[::row_step].to(torch.float32).reshape(-1, chunks, features // chunks)
    return sampled.square().sum(dim=0).sum(dim=-1)


def _stats(values: torch.Tensor, dead_threshold: float) -> torch.Tensor:
    # values: (rows, chunks, L) float32; reducing rows first is the fast order on CPU
    total = values.sum(dim=0).sum(dim=-1)
    squares = values.square().sum(dim=0).sum(dim=-1)
    dead = (values.abs() <= dead_threshold).to(torch.float32).sum(dim=0).sum(dim=-1)
    return torch.stack([total, squares, dead], dim=1)
