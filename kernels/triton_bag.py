"""Triton kernels for the weighted embedding bag and its two backwards.

Compiled on CUDA; on CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``
set before this module is imported), which is how the tests check them without a GPU.

- forward: one program per (bag, column block) loads BLOCK_K rows at a time as a
  (BLOCK_K, BLOCK_D) tile, so many row loads are in flight at once, and accumulates
  in fp32.
- scores backward: one program per (bag, K block) dots each of its rows with dy,
  walking D in column blocks.
- values backward: a reverse index (stable sort of the flat indices) gives each
  unique row the positions that read it, cut into segments of at most SEGMENT
  positions; one program per (segment, column block) sums its positions BLOCK_J at a
  time in a fixed order. A row of one segment (nearly every row) is written directly;
  a hot row's segments write partial sums that a second kernel adds up in segment
  order. No atomics, so the result is deterministic; and a row read by a large share
  of the batch no longer sets the kernel's time by itself.

Row offsets are computed in int64 (``row * stride`` with int64 rows), so tables with
more than 2**31 elements are addressable. Row widths need not be powers of two:
columns past D are masked. Tables may be fp32, bf16 or fp16; sums are fp32.

Letters: N bags, K rows per bag, D row width, U unique rows, M = N*K positions;
J is a block of one segment's positions (a segment: a run of one row's positions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memdist.kernels.torch_ops import reverse_index

# Tiles hold at most this many fp32 values per program. With 4 warps, 2048 keeps the
# kernels under ~100 registers a thread (ptxas, sm_90), so enough programs share an SM
# to keep many row loads in flight; 4096 doubled that and cut occupancy.
TILE_ELEMENTS = 2048
# Widest column block. On an H200 (2026-11-26, benchmarks/bench_gpu_kernels.py, 16M x 1024
# bf16 table, 16384 x 128 lookups) a whole 1024-wide row per program, 2 rows a step, ran
# the forward in 1.001 ms against 1.330 ms for 256-column blocks of 8 rows, and the
# values backward in 3.80 ms against 14.05 ms for 256 x 8.
MAX_BLOCK_D = 1024
# Positions one values-backward program sums at most (one hot row gets several programs).
SEGMENT = 128


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def forward_blocks(k: int, d: int) -> dict[str, int]:
    """Tile sizes of the forward kernel for bag size k and row width d."""
    block_d = _pow2(d, 16, MAX_BLOCK_D)
    return {"BLOCK_K": _pow2(k, 1, TILE_ELEMENTS // block_d), "BLOCK_D": block_d}


def scores_blocks(k: int, d: int) -> dict[str, int]:
    """Tile sizes of the scores-backward kernel."""
    block_k = _pow2(k, 1, 16)  # 16 x 128 beat 32 x 64 on an H200 (1.143 vs 1.268 ms)
    return {"BLOCK_K": block_k, "BLOCK_D": _pow2(d, 16, TILE_ELEMENTS // block_k)}


def values_blocks(d: int) -> dict[str, int]:
    """Tile sizes of the values-backward kernel.

    A fixed J block keeps each row's summation order a function of that row's own
    positions only. (Several segments per program, side by side, were slower on an
    H200: 5.565 ms against 4.999 ms for 2 x 1024 per segment.)
    """
    block_d = _pow2(d, 16, MAX_BLOCK_D)
    return {"BLOCK_J": min(16, TILE_ELEMENTS // block_d), "BLOCK_D": block_d}


@triton.jit
def _bag_forward_kernel(
    values_ptr,
    idx_ptr,
    scores_ptr,
    y_ptr,
    K,
    D,
    stride_v,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    cols_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok_D = cols_D < D
    acc_KD = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks_K = k0 + tl.arange(0, BLOCK_K)
        k_ok_K = ks_K < K
        rows_K = tl.load(idx_ptr + n * K + ks_K, mask=k_ok_K, other=0).to(tl.int64)
        s_K = tl.load(scores_ptr + n * K + ks_K, mask=k_ok_K, other=0.0).to(tl.float32)
        v_KD = tl.load(
            values_ptr + rows_K[:, None] * stride_v + cols_D[None, :],
            mask=k_ok_K[:, None] & col_ok_D[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_KD += s_K[:, None] * v_KD
    tl.store(y_ptr + n * D + cols_D, tl.sum(acc_KD, axis=0), mask=col_ok_D)


@triton.jit
def _bag_backward_scores_kernel(
    values_ptr,
    idx_ptr,
    dy_ptr,
    dscores_ptr,
    K,
    D,
    stride_v,
    stride_dy,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    ks_K = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok_K = ks_K < K
    rows_K = tl.load(idx_ptr + n * K + ks_K, mask=k_ok_K, other=0).to(tl.int64)
    acc_KD = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols_D = d0 + tl.arange(0, BLOCK_D)
        col_ok_D = cols_D < D
        dy_D = tl.load(dy_ptr + n * stride_dy + cols_D, mask=col_ok_D, other=0.0).to(tl.float32)
        v_KD = tl.load(
            values_ptr + rows_K[:, None] * stride_v + cols_D[None, :],
            mask=k_ok_K[:, None] & col_ok_D[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_KD += v_KD * dy_D[None, :]
    tl.store(dscores_ptr + n * K + ks_K, tl.sum(acc_KD, axis=1), mask=k_ok_K)


@triton.jit
def _bag_backward_values_kernel(
    bag_ptr,
    weight_ptr,
    start_ptr,
    end_ptr,
    dest_ptr,
    split_ptr,
    dy_ptr,
    grad_ptr,
    partial_ptr,
    D,
    stride_dy,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    cols_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok_D = cols_D < D
    start = tl.load(start_ptr + s)
    end = tl.load(end_ptr + s)
    acc_JD = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        js_J = j0 + tl.arange(0, BLOCK_J)
        j_ok_J = js_J < end
        # bag_ptr / weight_ptr list, in reverse-index order, the bag n and the score of
        # every position that read this row.
        bag_J = tl.load(bag_ptr + js_J, mask=j_ok_J, other=0).to(tl.int64)
        w_J = tl.load(weight_ptr + js_J, mask=j_ok_J, other=0.0)
        dy_JD = tl.load(
            dy_ptr + bag_J[:, None] * stride_dy + cols_D[None, :],
            mask=j_ok_J[:, None] & col_ok_D[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_JD += w_J[:, None] * dy_JD
    # A whole row's sum goes to its gradient row, a hot row's part to its partial row.
    dest = tl.load(dest_ptr + s)
    split_D = tl.load(split_ptr + s + cols_D * 0) != 0  # one flag, as a block for the masks
    sum_D = tl.sum(acc_JD, axis=0)
    tl.store(grad_ptr + dest * D + cols_D, sum_D, mask=col_ok_D & ~split_D)
    tl.store(partial_ptr + dest * D + cols_D, sum_D, mask=col_ok_D & split_D)


@triton.jit
def _sum_partials_kernel(
    partial_ptr, first_ptr, count_ptr, rows_ptr, grad_ptr, D, BLOCK_D: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64)
    cols_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok_D = cols_D < D
    first = tl.load(first_ptr + i)
    acc_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p in range(first, first + tl.load(count_ptr + i)):  # in segment order
        acc_D += tl.load(partial_ptr + p * D + cols_D, mask=col_ok_D, other=0.0)
    row = tl.load(rows_ptr + i)
    tl.store(grad_ptr + row * D + cols_D, acc_D, mask=col_ok_D)


# Whether the kernels above run under the interpreter (decided when they were decorated).
INTERPRETED = isinstance(_bag_forward_kernel, InterpretedFunction)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels address rows through a row stride but expect adjacent columns.
    return t if t.stride(1) == 1 else t.contiguous()


def bag_forward(
    values_VD: torch.Tensor,
    idx_NK: torch.Tensor,
    scores_NK: torch.Tensor,
    *,
    blocks: dict[str, int] | None = None,
) -> torch.Tensor:
    """``blocks`` (``BLOCK_K``, ``BLOCK_D``, optionally ``num_warps``, ``num_stages``)
    overrides the tiles, for benchmarks."""
    n, k = idx_NK.shape
    d = values_VD.shape[1]
    values_VD = _unit_stride(values_VD)
    y_ND = torch.empty(n, d, dtype=torch.float32, device=values_VD.device)
    blocks = blocks or forward_blocks(k, d)
    _bag_forward_kernel[(n, triton.cdiv(d, blocks["BLOCK_D"]))](
        values_VD,
        idx_NK.contiguous(),
        scores_NK.contiguous(),
        y_ND,
        k,
        d,
        values_VD.stride(0),
        **blocks,
    )
    return y_ND


def bag_backward_scores(
    values_VD: torch.Tensor,
    idx_NK: torch.Tensor,
    dy_ND: torch.Tensor,
    *,
    blocks: dict[str, int] | None = None,
) -> torch.Tensor:
    """``blocks`` (``BLOCK_K``, ``BLOCK_D``, optionally ``num_warps``) overrides the
    tiles, for benchmarks."""
    n, k = idx_NK.shape
    d = values_VD.shape[1]
    values_VD, dy_ND = _unit_stride(values_VD), _unit_stride(dy_ND)
    dscores_NK = torch.empty(n, k, dtype=torch.float32, device=values_VD.device)
    blocks = blocks or scores_blocks(k, d)
    _bag_backward_scores_kernel[(n, triton.cdiv(k, blocks["BLOCK_K"]))](
        values_VD,
        idx_NK.contiguous(),
        dy_ND,
        dscores_NK,
        k,
        d,
        values_VD.stride(0),
        dy_ND.stride(0),
        **blocks,
    )
    return dscores_NK


def segments(offsets_U1: torch.Tensor, segment: int) -> dict[str, torch.Tensor]:
    """Cut each row's positions ``offsets_U1[u]:offsets_U1[u+1]`` into runs of at most
    ``segment``: per segment its ``start``/``end``, its ``dest`` row (the gradient row,
    or for a row of several segments the partial row) and ``split``; per split row its
    ``rows``, ``first`` partial and partial ``count``."""
    device = offsets_U1.device
    counts_U = offsets_U1[1:] - offsets_U1[:-1]
    segs_U = torch.div(counts_U + segment - 1, segment, rounding_mode="floor")
    seg_first_U1 = torch.zeros_like(offsets_U1)
    torch.cumsum(segs_U, 0, out=seg_first_U1[1:])
    num_segments = int(seg_first_U1[-1])
    u = torch.arange(counts_U.numel(), device=device)
    row_S = torch.repeat_interleave(u, segs_U, output_size=num_segments)
    start_S = (
        offsets_U1[row_S]
        + (torch.arange(num_segments, device=device) - seg_first_U1[row_S]) * segment
    )
    split_U = segs_U > 1
    split_S = split_U[row_S]
    part_S = torch.cumsum(split_S, 0) - 1
    return {
        "start": start_S,
        "end": torch.minimum(start_S + segment, offsets_U1[row_S + 1]),
        "dest": torch.where(split_S, part_S, row_S),
        "split": split_S.to(torch.int8),
        "rows": u[split_U],
        "first": part_S[seg_first_U1[:-1][split_U]],
        "count": segs_U[split_U],
    }


def bag_backward_values(
    idx_NK: torch.Tensor,
    scores_NK: torch.Tensor,
    dy_ND: torch.Tensor,
    *,
    blocks: dict[str, int] | None = None,
    segment: int = SEGMENT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks`` (``BLOCK_J``, ``BLOCK_D``, optionally ``num_warps``) and ``segment``
    override the defaults, for benchmarks."""
    n, k = idx_NK.shape
    d = dy_ND.shape[1]
    dy_ND = _unit_stride(dy_ND)
    rows_U, offsets_U1, order_M = reverse_index(idx_NK)
    bag_M = torch.div(order_M, k, rounding_mode="floor")
    weight_M = scores_NK.reshape(-1).float()[order_M]
    grad_UD = torch.empty(rows_U.numel(), d, dtype=torch.float32, device=dy_ND.device)
    seg = segments(offsets_U1, segment)
    num_split = seg["rows"].numel()
    partial_PD = grad_UD  # never written when no row is split
    if num_split:
        partial_PD = torch.empty(
            int(seg["count"].sum()), d, dtype=torch.float32, device=dy_ND.device
        )
    blocks = blocks or values_blocks(d)
    grid = (seg["start"].numel(), triton.cdiv(d, blocks["BLOCK_D"]))
    _bag_backward_values_kernel[grid](
        bag_M,
        weight_M,
        seg["start"],
        seg["end"],
        seg["dest"],
        seg["split"],
        dy_ND,
        grad_UD,
        partial_PD,
        d,
        dy_ND.stride(0),
        **blocks,
    )
    if num_split:
        block_d = _pow2(d, 16, MAX_BLOCK_D)
        _sum_partials_kernel[(num_split, triton.cdiv(d, block_d))](
            partial_PD, seg["first"], seg["count"], seg["rows"], grad_UD, d, BLOCK_D=block_d
        )
    return rows_U, grad_UD
