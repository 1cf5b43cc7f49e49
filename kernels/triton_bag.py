"""Triton kernels for the weighted embedding bag, its two backwards and the sparse update.

Compiled on CUDA; on CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported), which is how the tests check them without a GPU.

- forward: one program per (bag, column block) sums K weighted rows in fp32.
- scores backward: one program per (bag, K block) dots each row with dy over D blocks.
- values backward: a reverse index (stable sort of the flat indices) gives each
  unique row the positions that read it; one program per (row, column block) sums
  them in position order. No atomics, so the result is deterministic.
- sparse update: one program per touched row applies SGD, row-wise Adagrad or lazy
  Adam to the whole row (row-wise Adagrad needs the row's mean squared gradient).

Row offsets are computed in int64, so tables beyond 2**31 elements are addressable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memdist.kernels.torch_ops import reverse_index

OPTIMIZER_CODES = {"sgd": 0, "adagrad": 1, "adam": 2}


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


@triton.jit
def _bag_forward_kernel(
    values_ptr,
    idx_ptr,
    scores_ptr,
    out_ptr,
    K,
    D,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(K):
        row = tl.load(idx_ptr + n * K + k).to(tl.int64)
        s = tl.load(scores_ptr + n * K + k).to(tl.float32)
        v = tl.load(values_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc += s * v
    tl.store(out_ptr + n.to(tl.int64) * D + cols, acc, mask=mask)


@triton.jit
def _bag_backward_scores_kernel(
    values_ptr,
    idx_ptr,
    dy_ptr,
    out_ptr,
    K,
    D,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    rows = tl.load(idx_ptr + n * K + ks, mask=kmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        dy = tl.load(dy_ptr + n.to(tl.int64) * D + cols, mask=cmask, other=0.0).to(tl.float32)
        v = tl.load(
            values_ptr + rows[:, None] * D + cols[None, :],
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(v * dy[None, :], axis=1)
    tl.store(out_ptr + n * K + ks, acc, mask=kmask)


@triton.jit
def _bag_backward_values_kernel(
    order_ptr,
    offsets_ptr,
    scores_ptr,
    dy_ptr,
    out_ptr,
    K,
    D,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    start = tl.load(offsets_ptr + u)
    end = tl.load(offsets_ptr + u + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(start, end):
        pos = tl.load(order_ptr + j)  # flat position n * K + k that read this row
        s = tl.load(scores_ptr + pos).to(tl.float32)
        n = pos // K
        dy = tl.load(dy_ptr + n * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc += s * dy
    tl.store(out_ptr + u.to(tl.int64) * D + cols, acc, mask=mask)


@triton.jit
def _sparse_update_kernel(
    values_ptr,
    rows_ptr,
    grad_ptr,
    sum_sq_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    bc1_ptr,
    bc2_ptr,
    D,
    lr,
    eps,
    beta1,
    beta2,
    weight_decay,
    OPTIMIZER: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0)
    row = tl.load(rows_ptr + u).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(values_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + u.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
    if weight_decay != 0.0:
        w = w * (1.0 - lr * weight_decay)
    if OPTIMIZER == 0:
        w = w - lr * g
    elif OPTIMIZER == 1:
        acc = tl.load(sum_sq_ptr + row) + tl.sum(g * g, axis=0) / D
        tl.store(sum_sq_ptr + row, acc)
        w = w - lr * g / (tl.sqrt(acc) + eps)
    else:
        m = beta1 * tl.load(exp_avg_ptr + row * D + cols, mask=mask, other=0.0) + (1.0 - beta1) * g
        v = (
            beta2 * tl.load(exp_avg_sq_ptr + row * D + cols, mask=mask, other=0.0)
            + (1.0 - beta2) * g * g
        )
        tl.store(exp_avg_ptr + row * D + cols, m, mask=mask)
        tl.store(exp_avg_sq_ptr + row * D + cols, v, mask=mask)
        bc1 = tl.load(bc1_ptr + u)
        bc2 = tl.load(bc2_ptr + u)
        w = w - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)
    tl.store(values_ptr + row * D + cols, w.to(values_ptr.dtype.element_ty), mask=mask)


def bag_forward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor
) -> torch.Tensor:
    n, k = idx_NK.shape
    d = values_VD.shape[1]
    out_ND = torch.empty(n, d, dtype=torch.float32, device=values_VD.device)
    if n == 0:
        return out_ND
    block_d = _block(d, 256)
    _bag_forward_kernel[(n, triton.cdiv(d, block_d))](
        values_VD, idx_NK.contiguous(), scores_NK.contiguous(), out_ND, k, d, BLOCK_D=block_d
    )
    return out_ND


def bag_backward_scores(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, dy_ND: torch.Tensor
) -> torch.Tensor:
    n, k = idx_NK.shape
    d = values_VD.shape[1]
    out_NK = torch.empty(n, k, dtype=torch.float32, device=values_VD.device)
    if n == 0:
        return out_NK
    block_k, block_d = _block(k, 64), _block(d, 64)
    _bag_backward_scores_kernel[(n, triton.cdiv(k, block_k))](
        values_VD,
        idx_NK.contiguous(),
        dy_ND.contiguous(),
        out_NK,
        k,
        d,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    return out_NK


def bag_backward_values(
    idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = idx_NK.shape
    d = dy_ND.shape[1]
    rows_U, offsets_U1, order_M = reverse_index(idx_NK)
    grad_UD = torch.empty(rows_U.numel(), d, dtype=torch.float32, device=dy_ND.device)
    if rows_U.numel() == 0:
        return rows_U, grad_UD
    block_d = _block(d, 256)
    _bag_backward_values_kernel[(rows_U.numel(), triton.cdiv(d, block_d))](
        order_M,
        offsets_U1,
        scores_NK.contiguous(),
        dy_ND.contiguous(),
        grad_UD,
        k,
        d,
        BLOCK_D=block_d,
    )
    return rows_U, grad_UD


def sparse_update_(
    optimizer: str,
    values_VD: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows_U: torch.Tensor,
    grad_UD: torch.Tensor,
    *,
    lr: float,
    eps: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> None:
    if rows_U.numel() == 0:
        return
    d = values_VD.shape[1]
    # Unused state pointers still need a tensor; the constexpr branch never reads them.
    dummy = grad_UD
    bc1_U = bc2_U = dummy
    if optimizer == "adam":
        # Per-row step counts and bias corrections in fp64 on the host side: 1 - beta**t
        # loses digits in fp32 for beta2 close to 1.
        t_U = state["step"].index_select(0, rows_U) + 1
        state["step"].index_copy_(0, rows_U, t_U)
        bc1_U = (1 - betas[0] ** t_U.double()).float()
        bc2_U = (1 - betas[1] ** t_U.double()).float()
    _sparse_update_kernel[(rows_U.numel(),)](
        values_VD,
        rows_U.contiguous(),
        grad_UD.float().contiguous(),
        state.get("sum_sq", dummy),
        state.get("exp_avg", dummy),
        state.get("exp_avg_sq", dummy),
        bc1_U,
        bc2_U,
        d,
        float(lr),
        float(eps),
        float(betas[0]),
        float(betas[1]),
        float(weight_decay),
        OPTIMIZER=OPTIMIZER_CODES[optimizer],
        BLOCK_D=triton.next_power_of_2(d),
    )
