"""The vectorised torch path: the CPU fallback where the C++ kernels cannot be built, and
the kernels' second oracle (beside ``reference``).

Deterministic: on CPU the value gradient sums each row's contributions with
``index_add_``, which runs serially on the CPU in position order, whatever the
sparsity pattern; on CUDA, where ``index_add_`` adds with atomics in no fixed order,
a segmented sum over the reverse index adds them in position order too. Shard/local parity depends on this: a CSR sparse-matrix product
and a chunked gather-and-sum for the scores were faster in isolation but rounded
differently for the compacted pattern a row-wise shard sees, so they are not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memdist.kernels.spec import OptimizerSpec


def bag_forward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor
) -> torch.Tensor:
    if values_VD.dtype == torch.float32:
        return F.embedding_bag(idx_NK, values_VD, per_sample_weights=scores_NK.float(), mode="sum")
    # Low-precision tables: gather the rows, accumulate in fp32.
    rows_NKD = values_VD[idx_NK].float()
    return torch.bmm(scores_NK.float().unsqueeze(1), rows_NKD).squeeze(1)


def bag_backward_scores(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, dy_ND: torch.Tensor
) -> torch.Tensor:
    rows_NKD = values_VD[idx_NK].float()
    return torch.bmm(rows_NKD, dy_ND.float().unsqueeze(-1)).squeeze(-1)


def reverse_index(idx_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_U, offsets_U1, order_M): flat positions of row u are order[offsets[u]:offsets[u+1]].

    A stable sort keeps each row's contributions in position order, so sums are
    deterministic on every backend.
    """
    flat_M = idx_NK.reshape(-1)
    sorted_M, order_M = torch.sort(flat_M, stable=True)
    rows_U, counts_U = torch.unique_consecutive(sorted_M, return_counts=True)
    offsets_U1 = torch.zeros(rows_U.numel() + 1, dtype=torch.int64, device=idx_NK.device)
    offsets_U1[1:] = torch.cumsum(counts_U, 0)
    return rows_U, offsets_U1, order_M


def bag_backward_values(
    idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = idx_NK.shape
    contrib_MD = (scores_NK.float().unsqueeze(-1) * dy_ND.float().unsqueeze(1)).reshape(n * k, -1)
    if dy_ND.device.type != "cpu":
        rows_U, offsets_U1, order_M = reverse_index(idx_NK)
        return rows_U, torch.segment_reduce(contrib_MD[order_M], "sum", offsets=offsets_U1)
    rows_U, inverse_M = torch.unique(idx_NK.reshape(-1), sorted=True, return_inverse=True)
    grad_UD = torch.zeros(rows_U.numel(), dy_ND.shape[1], dtype=torch.float32, device=dy_ND.device)
    grad_UD.index_add_(0, inverse_M, contrib_MD)
    return rows_U, grad_UD


def sparse_update_(
    spec: OptimizerSpec,
    values_VD: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows_U: torch.Tensor,
    grad_UD: torch.Tensor,
) -> None:
    w_UD = values_VD.index_select(0, rows_U).float()
    g_UD = grad_UD.float()
    if spec.weight_decay:
        w_UD.mul_(1 - spec.lr * spec.weight_decay)
    if spec.name == "sgd":
        w_UD.add_(g_UD, alpha=-spec.lr)
    elif spec.name == "adagrad":
        acc_U = state["sum_sq"].index_select(0, rows_U) + g_UD.pow(2).mean(1)
        state["sum_sq"].index_copy_(0, rows_U, acc_U)
        w_UD.sub_(spec.lr * g_UD / (acc_U.sqrt().unsqueeze(1) + spec.eps))
    else:
        b1, b2 = spec.betas
        t_U = state["step"].index_select(0, rows_U) + 1
        m_UD = state["exp_avg"].index_select(0, rows_U).mul_(b1).add_(g_UD, alpha=1 - b1)
        v_UD = (
            state["exp_avg_sq"].index_select(0, rows_U).mul_(b2).addcmul_(g_UD, g_UD, value=1 - b2)
        )
        state["step"].index_copy_(0, rows_U, t_U)
        state["exp_avg"].index_copy_(0, rows_U, m_UD)
        state["exp_avg_sq"].index_copy_(0, rows_U, v_UD)
        tf_U1 = t_U.double().unsqueeze(1)
        bc1 = (1 - b1**tf_U1).float()
        bc2 = (1 - b2**tf_U1).float()
        w_UD.sub_(spec.lr * (m_UD / bc1) / ((v_UD / bc2).sqrt() + spec.eps))
    values_VD.index_copy_(0, rows_U, w_UD.to(values_VD.dtype))


def half_key_topk(
    q_NHQ: torch.Tensor, keys_HCQ: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (N, H, C) scores of one product-key half, then their top-``knn``."""
    return torch.einsum("nhq,hcq->nhc", q_NHQ, keys_HCQ).topk(knn, dim=-1)


def query_norm(
    q_NH2Q: torch.Tensor, gain_H2Q: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.rms_norm`` over Q, times the gains and ``scale``; the two halves (views)."""
    q_NH2Q = F.rms_norm(q_NH2Q, (q_NH2Q.shape[-1],)) * gain_H2Q * scale
    return q_NH2Q[:, :, 0], q_NH2Q[:, :, 1]


def best_pairs(top1_NHK: torch.Tensor, top2_NHK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (i, j) of the knn best sums top1[i] + top2[j] of two sorted lists, best first.

    Only pairs with ``(i + 1) * (j + 1) <= knn`` are scored (50 of 256 for knn = 16): every
    pair (i', j') with i' <= i and j' <= j sums at least as high, so any other pair has
    knn pairs at least as good (ties aside).
    """
    knn = top1_NHK.shape[-1]
    i, j = torch.meshgrid(torch.arange(knn), torch.arange(knn), indexing="ij")
    keep = (i + 1) * (j + 1) <= knn
    r1_P, r2_P = i[keep].to(top1_NHK.device), j[keep].to(top1_NHK.device)
    pick_NHK = (top1_NHK[..., r1_P] + top2_NHK[..., r2_P]).topk(knn, dim=-1).indices
    return r1_P[pick_NHK], r2_P[pick_NHK]


def sum_squares(grad_UD: torch.Tensor) -> float:
    # One float64 copy, squared in place (fewer fresh pages than (g.double()).pow(2)).
    return float(grad_UD.double().pow_(2).sum())
