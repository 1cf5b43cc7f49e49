"""Plain torch reference implementations: obviously correct, slow, and the tests' ground truth.

Letters: N bags (tokens), K rows per bag, V table rows, D row width, U unique rows.
Everything is computed in fp32 (or fp64 where given) whatever the values' dtype.
"""

from __future__ import annotations

import torch


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
    rows_U, inverse = torch.unique(idx_NK.flatten(), sorted=True, return_inverse=True)
    contrib_NKD = scores_NK.float().unsqueeze(-1) * dy_ND.float().unsqueeze(1)
    grad_UD = torch.zeros(rows_U.numel(), dy_ND.shape[1], dtype=torch.float32, device=dy_ND.device)
    grad_UD.index_add_(0, inverse, contrib_NKD.reshape(-1, dy_ND.shape[1]))
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
    """Row by row, in fp32, the update each optimizer defines (see memdist.kernels)."""
    for u, row in enumerate(rows_U.tolist()):
        w = values_VD[row].float()
        g = grad_UD[u].float()
        if weight_decay:
            w = w - lr * weight_decay * w
        if optimizer == "sgd":
            w = w - lr * g
        elif optimizer == "adagrad":
            state["sum_sq"][row] += g.pow(2).mean()
            w = w - lr * g / (state["sum_sq"][row].sqrt() + eps)
        else:
            b1, b2 = betas
            t = int(state["step"][row]) + 1
            m = b1 * state["exp_avg"][row] + (1 - b1) * g
            v = b2 * state["exp_avg_sq"][row] + (1 - b2) * g * g
            state["exp_avg"][row], state["exp_avg_sq"][row], state["step"][row] = m, v, t
            w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        values_VD[row] = w.to(values_VD.dtype)
