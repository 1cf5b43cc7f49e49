"""The C++ CPU path: the lookup, fused backwards and sparse update, the default on CPU
where it builds.

``cpp_kernels.cpp`` is compiled by torch's ``cpp_extension`` on first use (about 30 s,
once per machine: the build is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``; later processes load it in about a second; see
``jit_build`` for why a killed build does not hang the next). It exists
because the torch path materialises N x K x D tensors in the backward (the gathered
rows for the scores' gradient, the score-weighted dy rows for the values') and makes
six index_select/index_copy passes in Adam; these kernels read each row once and
write nothing of that size (see benchmarks/bench_speed.py for the figures). The
forward computes what ``F.embedding_bag`` does (each bag summed in order, no fused
multiply-adds) but asks for the next bag's rows into L2 while it sums the current one,
which gathers a large table's rows 1.7x faster.

Deterministic like the torch path, and more so: each output element is computed by
one thread in a fixed order, with no fused multiply-adds, so results are the same for
any thread count and CPU instruction set, and for a row-wise shard's own entries of
each bag (bags of any length: ``entries_forward``, ``entries_backward``).
The values' gradient is bit-for-bit the torch path's (products summed in flat
position order from zero); the scores' dot products and the optimizer's arithmetic
round differently from torch's (within the reference tolerances).

fp32 tables only; bf16/fp16 tables use the torch path's functions. Built with
-fno-math-errno, which lets the compiler vectorise Adam's square roots (sqrt is correctly
rounded either way, so the bits do not change; errno is never read).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

from memdist.kernels import jit_build, torch_ops
from memdist.kernels.spec import OptimizerSpec

T = TypeVar("T")

NAME = "memdist_cpp_kernels"
SOURCE = Path(__file__).with_name("cpp_kernels.cpp")
# No -march=native: the build must compute the same bits on every x86-64 it runs on.
# -fopenmp: at::parallel_for is inline OpenMP; the link finds the libgomp.so.1 torch
# has already loaded, so torch.set_num_threads governs these kernels too.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
OPTIMIZER_CODES = {"sgd": 0, "adagrad": 1, "adam": 2}


def bag_forward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor
) -> torch.Tensor:
    if values_VD.dtype != torch.float32 or not values_VD.is_contiguous():
        return torch_ops.bag_forward(values_VD, idx_NK, scores_NK)
    return extension().bag_forward(
        values_VD, idx_NK.contiguous(), scores_NK.float().contiguous(), None
    )


def entries_forward(
    values_VD: torch.Tensor, idx_E: torch.Tensor, scores_E: torch.Tensor, offsets_N1: torch.Tensor
) -> torch.Tensor:
    """``bag_forward`` over bags of any length: bag n sums entries
    ``[offsets_N1[n], offsets_N1[n + 1])`` in order (fp32 tables)."""
    return extension().bag_forward(
        values_VD, idx_E.contiguous(), scores_E.float().contiguous(), offsets_N1.contiguous()
    )


def row_entries(idx_NK: torch.Tensor, starts_M1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A lookup's entries split among the shards of a row plan (shard s holds rows
    ``[starts_M1[s], starts_M1[s + 1])``, every index in one of them): the flat
    positions of each shard's entries in order, shard after shard, and M x (N + 1) int32
    offsets of each bag among its shard's entries."""
    positions_E, offsets_MN1 = extension().row_entries(
        idx_NK.to(torch.int64).contiguous(), starts_M1.to(torch.int64).contiguous()
    )
    return positions_E, offsets_MN1


@functools.cache
def extension() -> ModuleType:
    """The compiled kernels (built on the first call in a machine's life, then loaded)."""
    from torch.utils.cpp_extension import load

    return jit_build.guarded(NAME, lambda: load(
        name=NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
        verbose=False,
    ))  # fmt: skip


@functools.cache
def available() -> bool:
    """Whether the kernels build and load here (a C++ compiler and ninja are needed)."""
    try:
        extension()
    except Exception as exc:  # a missing compiler raises anything from OSError to RuntimeError
        warnings.warn(f"memdist C++ CPU kernels unavailable, using the torch path: {exc}",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return False
    return True


HUGE_PAGE_MIN_BYTES = 64 * 2**20


def empty_table(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """``torch.empty``, asking for 2 MiB pages when it is a CPU tensor of 64 MiB or more
    and the kernels are built (before anything writes it: the advice applies to pages
    not yet touched). Table rows are read in random order; huge pages spare the TLB."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.nbytes >= HUGE_PAGE_MIN_BYTES and available():
        extension().advise_huge_pages(t)
    return t


def bag_backward_scores(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, dy_ND: torch.Tensor
) -> torch.Tensor:
    if values_VD.dtype != torch.float32 or not values_VD.is_contiguous():
        return torch_ops.bag_backward_scores(values_VD, idx_NK, dy_ND)
    return extension().bag_backward_scores(
        values_VD, idx_NK.contiguous(), dy_ND.float().contiguous()
    )


def reverse_index(idx_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch_ops.reverse_index``'s result, by a counting or a radix sort."""
    flat_M = idx_NK.reshape(-1).contiguous()
    lo, hi = torch.aminmax(flat_M)
    if int(lo) < 0:
        return torch_ops.reverse_index(idx_NK)
    rows_U, offsets_U1, order_M = extension().reverse_index(flat_M, int(hi) + 1)
    return rows_U, offsets_U1, order_M


def bag_backward_values(
    idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rows_U, offsets_U1, order_M = reverse_index(idx_NK)
    grad_UD = extension().bag_backward_values(
        order_M, offsets_U1, scores_NK.float().reshape(-1).contiguous(),
        dy_ND.float().contiguous(), idx_NK.shape[1],
    )  # fmt: skip
    return rows_U, grad_UD


def bag_backward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both backwards in one pass over the touched rows (each read once)."""
    if values_VD.dtype != torch.float32 or not values_VD.is_contiguous():
        rows_U, grad_UD = bag_backward_values(idx_NK, scores_NK, dy_ND)
        return torch_ops.bag_backward_scores(values_VD, idx_NK, dy_ND), rows_U, grad_UD
    return _fused_backward(values_VD, idx_NK, scores_NK, dy_ND, idx_NK.shape[1], None)


def entries_backward(
    values_VD: torch.Tensor,
    idx_E: torch.Tensor,
    scores_E: torch.Tensor,
    offsets_N1: torch.Tensor,
    dy_ND: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bag_backward`` over bags of any length (``entries_forward``'s): dscores_E one per
    entry, each row's gradient summed in entry order (fp32 tables)."""
    return _fused_backward(values_VD, idx_E, scores_E, dy_ND, 0, offsets_N1.contiguous())


def _fused_backward(
    values_VD: torch.Tensor,
    idx: torch.Tensor,
    scores: torch.Tensor,
    dy_ND: torch.Tensor,
    k: int,
    offsets_N1: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows_U, offsets_U1, order_M = reverse_index(idx)
    dscores, grad_UD = extension().bag_backward(
        values_VD, rows_U, offsets_U1, order_M, scores.float().reshape(-1).contiguous(),
        dy_ND.float().contiguous(), k, offsets_N1,
    )  # fmt: skip
    return dscores, rows_U, grad_UD


_CORRECTIONS: dict[float, torch.Tensor] = {}


def bias_corrections(beta: float, hi: int) -> torch.Tensor:
    """``c[t] = 1 - beta**t`` for t = 0 .. at least ``hi``, fp32. As torch_ops, computed in
    float64 (fp32 loses 1 - 0.999**t's digits for small t); once per t, not per row and
    step: the table is kept and doubled when a step count passes its end."""
    table = _CORRECTIONS.get(beta)
    if table is None or table.numel() <= hi:
        t = torch.arange(max(1024, 2 * (hi + 1)), dtype=torch.float64)
        table = _CORRECTIONS[beta] = (1 - beta**t).float()
    return table


def sparse_update_(
    spec: OptimizerSpec,
    values_VD: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows_U: torch.Tensor,
    grad_UD: torch.Tensor,
) -> None:
    if values_VD.dtype != torch.float32 or not values_VD.is_contiguous():
        torch_ops.sparse_update_(spec, values_VD, state, rows_U, grad_UD)
        return
    none = torch.empty(0)
    bc1_U = bc2_U = none
    if spec.name == "adam":
        t_U = state["step"].index_select(0, rows_U).add_(1)
        hi = int(t_U.max()) if t_U.numel() else 0
        bc1_U = bias_corrections(spec.betas[0], hi)[t_U]
        bc2_U = bias_corrections(spec.betas[1], hi)[t_U]
    extension().sparse_update(
        values_VD, rows_U.contiguous(), grad_UD.float().contiguous(),
        state.get("sum_sq", none), state.get("exp_avg", none), state.get("exp_avg_sq", none),
        state.get("step", torch.empty(0, dtype=torch.int64)), bc1_U, bc2_U,
        OPTIMIZER_CODES[spec.name], spec.lr, spec.eps, spec.betas[0], spec.betas[1],
        spec.weight_decay,
    )  # fmt: skip


class HalfKeyTopK(torch.autograd.Function):
    """Top-``knn`` scores and indices of one product-key half; gradients flow to the
    query and the keys through the selected scores only, as through einsum + topk."""

    @staticmethod
    def forward(ctx, q_NHQ, keys_HCQ, knn):
        q_NHQ, keys_HCQ = q_NHQ.float().contiguous(), keys_HCQ.float().contiguous()
        keysT_HQC = keys_HCQ.transpose(1, 2).contiguous()
        vals_NHK, idx_NHK = extension().half_key_topk(q_NHQ, keysT_HQC, knn)
        ctx.save_for_backward(q_NHQ, keys_HCQ, idx_NHK)
        ctx.mark_non_differentiable(idx_NHK)
        return vals_NHK, idx_NHK

    @staticmethod
    def backward(ctx, dvals_NHK, _didx):
        q_NHQ, keys_HCQ, idx_NHK = ctx.saved_tensors
        dq_NHQ, dkeys_HCQ = extension().half_key_topk_backward(
            dvals_NHK.float().contiguous(), idx_NHK, q_NHQ, keys_HCQ
        )
        return dq_NHQ, dkeys_HCQ, None


def half_key_topk(
    q_NHQ: torch.Tensor, keys_HCQ: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if q_NHQ.dtype != torch.float32 or keys_HCQ.dtype != torch.float32:
        return torch_ops.half_key_topk(q_NHQ, keys_HCQ, knn)
    return HalfKeyTopK.apply(q_NHQ, keys_HCQ, knn)


class QueryNorm(torch.autograd.Function):
    """``torch_ops.query_norm`` in one pass each way: no (N, H, 2, Q) temporaries, and
    each half comes out contiguous for ``half_key_topk``."""

    @staticmethod
    def forward(ctx, q_NH2Q, gain_H2Q, scale):
        q_NH2Q, gain_H2Q = q_NH2Q.float().contiguous(), gain_H2Q.float().contiguous()
        eps = torch.finfo(torch.float32).eps
        q1_NHQ, q2_NHQ, rstd_NH2 = extension().query_norm(q_NH2Q, gain_H2Q, scale, eps)
        ctx.save_for_backward(q_NH2Q, gain_H2Q, rstd_NH2)
        ctx.scale = scale
        return q1_NHQ, q2_NHQ

    @staticmethod
    def backward(ctx, d1_NHQ, d2_NHQ):
        q_NH2Q, gain_H2Q, rstd_NH2 = ctx.saved_tensors
        d1_NHQ, d2_NHQ = (torch.zeros_like(q_NH2Q[:, :, 0]) if d is None else d.float().contiguous()
                          for d in (d1_NHQ, d2_NHQ))  # fmt: skip
        dq_NH2Q, dgain_H2Q = extension().query_norm_backward(
            d1_NHQ, d2_NHQ, q_NH2Q, gain_H2Q, rstd_NH2, ctx.scale
        )
        return dq_NH2Q, dgain_H2Q, None


def query_norm(
    q_NH2Q: torch.Tensor, gain_H2Q: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if q_NH2Q.dtype != torch.float32 or gain_H2Q.dtype != torch.float32:
        return torch_ops.query_norm(q_NH2Q, gain_H2Q, scale)
    return QueryNorm.apply(q_NH2Q, gain_H2Q, scale)


def best_pairs(top1_NHK: torch.Tensor, top2_NHK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return extension().best_pairs(top1_NHK.float().contiguous(), top2_NHK.float().contiguous())


class ProductPairs(torch.autograd.Function):
    """``memdist.kernels.product_pairs`` in one pass: ranks, sums and rows together, and the
    sums' backward without the gathers' scatters."""

    @staticmethod
    def forward(ctx, top1_NHK, i1_NHK, top2_NHK, i2_NHK, n_keys):
        best_NHK, rows_NHK, r1_NHK, r2_NHK = extension().product_pairs(
            top1_NHK.float().contiguous(), i1_NHK.contiguous(), top2_NHK.float().contiguous(),
            i2_NHK.contiguous(), n_keys,
        )  # fmt: skip
        ctx.save_for_backward(r1_NHK, r2_NHK)
        ctx.mark_non_differentiable(rows_NHK)
        return best_NHK, rows_NHK

    @staticmethod
    def backward(ctx, dbest_NHK, _drows):
        r1_NHK, r2_NHK = ctx.saved_tensors
        d1_NHK, d2_NHK = extension().product_pairs_backward(
            dbest_NHK.float().contiguous(), r1_NHK, r2_NHK
        )
        return d1_NHK, None, d2_NHK, None, None


def product_pairs(
    top1_NHK: torch.Tensor,
    i1_NHK: torch.Tensor,
    top2_NHK: torch.Tensor,
    i2_NHK: torch.Tensor,
    n_keys: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``memdist.kernels.product_pairs`` for fp32 lists."""
    return ProductPairs.apply(top1_NHK, i1_NHK, top2_NHK, i2_NHK, n_keys)


def sum_squares(grad_UD: torch.Tensor) -> float:
    if grad_UD.dtype != torch.float32 or not grad_UD.is_contiguous() or grad_UD.ndim != 2:
        return torch_ops.sum_squares(grad_UD)
    return float(extension().sum_squares(grad_UD))


def parked(wait: Callable[[], T]) -> T:
    """``wait()``, with this process's other OpenMP threads asleep until it returns (or
    raises) instead of spinning: for a wait on other processes, such as memory shards on
    the same cores. Without the kernels, just ``wait()``."""
    return extension().parked(wait) if available() else wait()
