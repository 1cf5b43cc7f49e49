"""Triton kernels for the weighted embedding bag and its two backwards.

Compiled on CUDA; on CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``
set before this module is imported), which is how the tests check them without a GPU.

- forward: one program per (bag, column block) loads BLOCK_K rows at a time as a
  (BLOCK_K, BLOCK_D) tile, so many row loads are in flight at once, and accumulates
  in fp32.
- scores backward: one program per (bag, K block) dots each of its rows with dy,
  walking D in column blocks.
- values backward: a reverse index (stable sort of the flat indices) gives each
  unique row the positions that read it; one program per (row, column block) sums
  them BLOCK_J at a time in a fixed order. No atomics, so the result is deterministic.

Row offsets are computed in int64 (``row * stride`` with int64 rows), so tables with
more than 2**31 elements are addressable. Row widths need not be powers of two:
columns past D are masked. Tables may be fp32, bf16 or fp16; sums are fp32.

Letters: N bags, K rows per bag, D row width, U unique rows, M = N*K positions;
J is a block of one row's positions.
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


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def forward_blocks(k: int, d: int) -> dict[str, int]:
    """Tile sizes of the forward kernel for bag size k and row width d."""
    block_d = _pow2(d, 16, 256)
    return {"BLOCK_K": _pow2(k, 1, TILE_ELEMENTS // block_d), "BLOCK_D": block_d}


def scores_blocks(k: int, d: int) -> dict[str, int]:
    """Tile sizes of the scores-backward kernel."""
    block_k = _pow2(k, 1, 32)
    return {"BLOCK_K": block_k, "BLOCK_D": _pow2(d, 16, TILE_ELEMENTS // block_k)}


def values_blocks(d: int) -> dict[str, int]:
    """Tile sizes of the values-backward kernel.

    A fixed J block keeps each row's summation order a function of that row's own
    positions only; hot rows simply loop over more blocks.
    """
    block_d = _pow2(d, 16, 256)
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
    offsets_ptr,
    dy_ptr,
    grad_ptr,
    D,
    stride_dy,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    cols_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok_D = cols_D < D
    start = tl.load(offsets_ptr + u)
    end = tl.load(offsets_ptr + u + 1)
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
    tl.store(grad_ptr + u * D + cols_D, tl.sum(acc_JD, axis=0), mask=col_ok_D)


# Whether the kernels above run under the interpreter (decided when they were decorated).
INTERPRETED = isinstance(_bag_forward_kernel, InterpretedFunction)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels address rows through a row stride but expect adjacent columns.
    return t if t.stride(1) == 1 else t.contiguous()


def bag_forward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor
) -> torch.Tensor:
    n, k = idx_NK.shape
    d = values_VD.shape[1]
    values_VD = _unit_stride(values_VD)
    y_ND = torch.empty(n, d, dtype=torch.float32, device=values_VD.device)
    blocks = forward_blocks(k, d)
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
    values_VD: torch.Tensor, idx_NK: torch.Tensor, dy_ND: torch.Tensor
) -> torch.Tensor:
    n, k = idx_NK.shape
    d = values_VD.shape[1]
    values_VD, dy_ND = _unit_stride(values_VD), _unit_stride(dy_ND)
    dscores_NK = torch.empty(n, k, dtype=torch.float32, device=values_VD.device)
    blocks = scores_blocks(k, d)
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


def bag_backward_values(
    idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = idx_NK.shape
    d = dy_ND.shape[1]
    dy_ND = _unit_stride(dy_ND)
    rows_U, offsets_U1, order_M = reverse_index(idx_NK)
    bag_M = torch.div(order_M, k, rounding_mode="floor")
    weight_M = scores_NK.reshape(-1).float()[order_M]
    grad_UD = torch.empty(rows_U.numel(), d, dtype=torch.float32, device=dy_ND.device)
    blocks = values_blocks(d)
    _bag_backward_values_kernel[(rows_U.numel(), triton.cdiv(d, blocks["BLOCK_D"]))](
        bag_M,
        weight_M,
        offsets_U1,
        dy_ND,
        grad_UD,
        d,
        dy_ND.stride(0),
        **blocks,
    )
    return rows_U, grad_UD
