"""Triton kernel for the fused sparse optimizer update of a value table's touched rows.

One program per touched row reads the row, its gradient and its state once, applies
SGD, row-wise Adagrad or lazy Adam in fp32, and writes row and state back in place.
A program owns a whole row because row-wise Adagrad needs the row's mean squared
gradient before it can scale any column. Rows must be unique (the public function
checks), so programs never write the same memory and no atomics are needed.

Adam's per-row step counts and bias corrections are computed by torch in float64
before the launch: ``1 - 0.999**t`` loses most of its digits in fp32 when t is small.

Letters: V table rows, D row width, U touched rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memdist.errors import ShapeError
from memdist.kernels.spec import OptimizerSpec
from memdist.kernels.triton_bag import INTERPRETED

OPTIMIZER_CODES = {"sgd": 0, "adagrad": 1, "adam": 2}


def update_launch(d: int) -> dict[str, int]:
    """Row tile and warps for row width d: more warps for wide rows, so a thread's share
    of the row (values, gradient, two moments) stays in registers (ptxas spills at
    d=16384 with 4 warps)."""
    block_d = triton.next_power_of_2(d)
    return {"BLOCK_D": block_d, "num_warps": 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16}


@triton.jit
def _bf16_round_nearest_even(x):
    # Triton 3.9's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest
    # even; truncation would drift bf16 tables towards zero and make interpreted runs
    # disagree with the GPU and torch. Round by hand there: add half an ulp (ties to
    # even) to the fp32 bits and keep the top 16.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # A NaN whose payload sits in the low bits would carry into an infinity.
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


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
    stride_v,
    stride_g,
    lr,
    eps,
    beta1,
    beta2,
    decay,
    OPTIMIZER: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u).to(tl.int64)
    cols_D = tl.arange(0, BLOCK_D)
    ok_D = cols_D < D
    w_D = tl.load(values_ptr + row * stride_v + cols_D, mask=ok_D, other=0.0).to(tl.float32)
    g_D = tl.load(grad_ptr + u * stride_g + cols_D, mask=ok_D, other=0.0).to(tl.float32)
    if decay != 0.0:  # decay = lr * weight_decay, rounded once as in the torch paths
        w_D = w_D - decay * w_D
    if OPTIMIZER == 0:
        w_D = w_D - lr * g_D
    elif OPTIMIZER == 1:
        # Masked columns load as 0, so the sum covers exactly the D real columns.
        acc = tl.load(sum_sq_ptr + row) + tl.sum(g_D * g_D, axis=0) / D
        tl.store(sum_sq_ptr + row, acc)
        w_D = w_D - lr * g_D / (tl.sqrt(acc) + eps)
    else:
        state_D = row * D + cols_D
        m_D = beta1 * tl.load(exp_avg_ptr + state_D, mask=ok_D, other=0.0) + (1.0 - beta1) * g_D
        v_D = tl.load(exp_avg_sq_ptr + state_D, mask=ok_D, other=0.0)
        v_D = beta2 * v_D + (1.0 - beta2) * g_D * g_D
        tl.store(exp_avg_ptr + state_D, m_D, mask=ok_D)
        tl.store(exp_avg_sq_ptr + state_D, v_D, mask=ok_D)
        bc1 = tl.load(bc1_ptr + u)
        bc2 = tl.load(bc2_ptr + u)
        w_D = w_D - lr * (m_D / bc1) / (tl.sqrt(v_D / bc2) + eps)
    out_ty = values_ptr.dtype.element_ty
    w_out_D = _bf16_round_nearest_even(w_D) if BF16_BY_HAND else w_D.to(out_ty)
    tl.store(values_ptr + row * stride_v + cols_D, w_out_D, mask=ok_D)


def sparse_update_(
    spec: OptimizerSpec,
    values_VD: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows_U: torch.Tensor,
    grad_UD: torch.Tensor,
) -> None:
    if values_VD.stride(1) != 1:
        # A contiguous copy would take the update and leave the caller's table stale.
        raise ShapeError(
            f"values with column stride {values_VD.stride(1)} cannot be updated in place by "
            f"the Triton kernel; it needs adjacent columns (stride 1)"
        )
    d = values_VD.shape[1]
    grad_UD = grad_UD.float()
    if grad_UD.stride(1) != 1:
        grad_UD = grad_UD.contiguous()
    # Pointers the chosen optimizer never reads still need a tensor to point at.
    unused = grad_UD
    bc1_U = bc2_U = unused
    if spec.name == "adam":
        t_U = state["step"].index_select(0, rows_U) + 1
        state["step"].index_copy_(0, rows_U, t_U)
        bc1_U = (1 - spec.betas[0] ** t_U.double()).float()
        bc2_U = (1 - spec.betas[1] ** t_U.double()).float()
    _sparse_update_kernel[(rows_U.numel(),)](
        values_VD,
        rows_U.contiguous(),
        grad_UD,
        state.get("sum_sq", unused),
        state.get("exp_avg", unused),
        state.get("exp_avg_sq", unused),
        bc1_U,
        bc2_U,
        d,
        values_VD.stride(0),
        grad_UD.stride(0),
        spec.lr,
        spec.eps,
        spec.betas[0],
        spec.betas[1],
        spec.lr * spec.weight_decay,
        OPTIMIZER=OPTIMIZER_CODES[spec.name],
        BF16_BY_HAND=INTERPRETED and values_VD.dtype == torch.bfloat16,
        **update_launch(d),
    )
