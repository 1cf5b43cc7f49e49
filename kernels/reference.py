"""Plain torch reference implementations: obviously correct, slow, the tests' ground truth.

Letters: N bags (tokens), K rows per bag, V table rows, D row width, U unique rows.
Everything is computed in fp32 whatever the values' dtype. Callers (the public
functions in ``memdist.kernels``) have already checked shapes and index ranges.
"""

from __future__ import annotations

import torch

from memdist.kernels.spec import OptimizerSpec


def bag_forward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor
) -> torch.Tensor:
    rows_NKD = values_VD[idx_NK].float()
    return (scores_NK.float().unsqueeze(-1) * rows_NKD).sum(1)


def bag_backward_scores(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, dy_ND: torch.Tensor
) -> torch.Tensor:
    return (values_VD[idx_NK].float() * dy_ND.float().unsqueeze(1)).sum(-1)


def bag_backward_values(
    idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rows_U, inverse_NK = torch.unique(idx_NK, sorted=True, return_inverse=True)
    contrib_NKD = scores_NK.float().unsqueeze(-1) * dy_ND.float().unsqueeze(1)
    grad_UD = torch.zeros(rows_U.numel(), dy_ND.shape[1], dtype=torch.float32, device=dy_ND.device)
    grad_UD.index_add_(0, inverse_NK.reshape(-1), contrib_NKD.reshape(-1, dy_ND.shape[1]))
    return rows_U, grad_UD


def half_key_topk(
    q_NHQ: torch.Tensor, keys_HCQ: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return (q_NHQ.unsqueeze(2) * keys_HCQ.unsqueeze(0)).sum(-1).topk(knn, dim=-1)


def query_norm(
    q_NH2Q: torch.Tensor, gain_H2Q: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.finfo(q_NH2Q.dtype).eps
    q_NH2Q = q_NH2Q * torch.rsqrt(q_NH2Q.pow(2).mean(-1, keepdim=True) + eps) * gain_H2Q * scale
    return q_NH2Q[:, :, 0], q_NH2Q[:, :, 1]


def best_pairs(top1_NHK: torch.Tensor, top2_NHK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    knn = top1_NHK.shape[-1]
    flat_NHK = (top1_NHK.unsqueeze(-1) + top2_NHK.unsqueeze(-2)).flatten(-2).topk(knn).indices
    return torch.div(flat_NHK, knn, rounding_mode="floor"), flat_NHK % knn


def sparse_update_(
    spec: OptimizerSpec,
    values_VD: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows_U: torch.Tensor,
    grad_UD: torch.Tensor,
) -> None:
    """Row by row, in fp32, the update each optimizer defines (see memdist.kernels)."""
    for u, row in enumerate(rows_U.tolist()):
        w_D = values_VD[row].float()
        g_D = grad_UD[u].float()
        if spec.weight_decay:
            w_D = w_D - spec.lr * spec.weight_decay * w_D
        if spec.name == "sgd":
            w_D = w_D - spec.lr * g_D
        elif spec.name == "adagrad":
            acc = state["sum_sq"][row] + g_D.pow(2).mean()
            state["sum_sq"][row] = acc
            w_D = w_D - spec.lr * g_D / (acc.sqrt() + spec.eps)
        elif spec.name == "adam":
            b1, b2 = spec.betas
            t = int(state["step"][row]) + 1
            m_D = b1 * state["exp_avg"][row] + (1 - b1) * g_D
            v_D = b2 * state["exp_avg_sq"][row] + (1 - b2) * g_D * g_D
            state["exp_avg"][row], state["exp_avg_sq"][row], state["step"][row] = m_D, v_D, t
            # Bias corrections in float64: 1 - 0.999**t is tiny for small t.
            m_hat_D = m_D / (1 - b1**t)
            v_hat_D = v_D / (1 - b2**t)
            w_D = w_D - spec.lr * m_hat_D / (v_hat_D.sqrt() + spec.eps)
        else:
            raise AssertionError(f"unreachable: optimizer {spec.name!r} was checked by the caller")
        values_VD[row] = w_D.to(values_VD.dtype)


def sum_squares(grad_UD: torch.Tensor) -> float:
    return float(grad_UD.double().pow(2).sum())
