"""Kernels for memory lookups: weighted embedding bag, its backwards, sparse optimizers.

Imported as ``memdist.kernels``; depends only on torch and triton (triton is
imported on first use of the Triton backend). Every public function takes
``backend``: ``"auto"`` (Triton on CUDA tensors, the fast torch path otherwise),
``"triton"`` (on CPU this needs ``TRITON_INTERPRET=1`` before triton is imported),
``"torch"`` or ``"reference"``.

The math (N bags, K rows per bag, V table rows, D row width, U unique rows):

- forward ``y_ND[n] = sum_k scores_NK[n, k] * values_VD[idx_NK[n, k]]``
- scores backward ``dscores_NK[n, k] = <dy_ND[n], values_VD[idx_NK[n, k]]>``
- values backward: sorted unique ``rows_U`` and ``grad_UD[u] = sum over (n, k) reading
  rows_U[u] of scores_NK[n, k] * dy_ND[n]`` (deterministic: no float atomics)
- sparse update of the touched rows (state fp32, values fp32 or bf16):
  ``sgd`` w -= lr g; ``adagrad`` (row-wise) s += mean(g^2), w -= lr g / (sqrt(s) + eps);
  ``adam`` (lazy, per-row step count t) m, v moments, w -= lr m^ / (sqrt(v^) + eps).
  Decoupled weight decay, when set, shrinks touched rows only.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from memdist.errors import ConfigError, IndexOutOfRangeError, ShapeError
from memdist.kernels import reference, torch_ops

BACKENDS = ("auto", "torch", "triton", "reference")
OPTIMIZERS = ("sgd", "adagrad", "adam")
GradSink = Callable[[torch.Tensor, torch.Tensor], None]


def _impl(backend: str, device: torch.device) -> ModuleType:
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        from memdist.kernels import triton_bag

        return triton_bag
    return torch_ops if backend == "torch" else reference


def check_indices(idx_NK: torch.Tensor, num_rows: int) -> None:
    """Raise ``IndexOutOfRangeError`` naming the first index outside ``[0, num_rows)``."""
    if idx_NK.numel() == 0:
        return
    lo, hi = torch.aminmax(idx_NK)
    if int(lo) >= 0 and int(hi) < num_rows:
        return
    bad = ((idx_NK < 0) | (idx_NK >= num_rows)).nonzero()[0].tolist()
    value = int(idx_NK[tuple(bad)])
    raise IndexOutOfRangeError(
        f"index {value} at position {tuple(bad)} is outside the value table of {num_rows} rows "
        f"(indices must be in [0, {num_rows}))"
    )


def _check_bag(values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> None:
    if values_VD.ndim != 2:
        raise ShapeError(f"values must be 2-D (rows, dim), got shape {tuple(values_VD.shape)}")
    if idx_NK.ndim != 2 or idx_NK.dtype not in (torch.int64, torch.int32):
        raise ShapeError(
            f"indices must be a 2-D int64/int32 tensor, got {idx_NK.dtype} {tuple(idx_NK.shape)}"
        )
    if scores_NK.shape != idx_NK.shape:
        raise ShapeError(
            f"scores shape {tuple(scores_NK.shape)} must equal indices shape {tuple(idx_NK.shape)}"
        )
    if not scores_NK.is_floating_point():
        raise ShapeError(f"scores must be floating point, got {scores_NK.dtype}")


def _check_dy(dy_ND: torch.Tensor, n: int, d: int) -> None:
    if tuple(dy_ND.shape) != (n, d):
        raise ShapeError(f"output gradient has shape {tuple(dy_ND.shape)}, expected ({n}, {d})")


def bag_forward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Weighted sum of rows per bag, in fp32, shape (N, D)."""
    _check_bag(values_VD, idx_NK, scores_NK)
    check_indices(idx_NK, values_VD.shape[0])
    return _impl(backend, values_VD.device).bag_forward(values_VD, idx_NK.long(), scores_NK)


def bag_backward_scores(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, dy_ND: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Gradient of the bag output with respect to the scores, fp32, shape (N, K)."""
    _check_dy(dy_ND, idx_NK.shape[0], values_VD.shape[1])
    return _impl(backend, values_VD.device).bag_backward_scores(values_VD, idx_NK.long(), dy_ND)


def bag_backward_values(
    idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse gradient of the table: sorted unique rows (int64) and their fp32 gradients."""
    if dy_ND.ndim != 2 or dy_ND.shape[0] != idx_NK.shape[0]:
        raise ShapeError(
            f"output gradient has shape {tuple(dy_ND.shape)}, expected ({idx_NK.shape[0]}, D)"
        )
    return _impl(backend, dy_ND.device).bag_backward_values(idx_NK.long(), scores_NK, dy_ND)


def init_optimizer_state(
    optimizer: str, num_rows: int, dim: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Zeroed fp32 optimizer state for a table (empty for SGD)."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"value optimizer {optimizer!r} must be one of {OPTIMIZERS}")
    if optimizer == "sgd":
        return {}
    if optimizer == "adagrad":
        return {"sum_sq": torch.zeros(num_rows, dtype=torch.float32, device=device)}
    return {
        "exp_avg": torch.zeros(num_rows, dim, dtype=torch.float32, device=device),
        "exp_avg_sq": torch.zeros(num_rows, dim, dtype=torch.float32, device=device),
        "step": torch.zeros(num_rows, dtype=torch.int64, device=device),
    }


def sparse_update_(
    optimizer: str,
    values_VD: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows_U: torch.Tensor,
    grad_UD: torch.Tensor,
    *,
    lr: float,
    eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    backend: str = "auto",
) -> None:
    """Apply ``optimizer`` in place to ``values_VD[rows_U]`` and its state; rows must be unique."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"value optimizer {optimizer!r} must be one of {OPTIMIZERS}")
    if grad_UD.shape != (rows_U.numel(), values_VD.shape[1]):
        raise ShapeError(
            f"gradient shape {tuple(grad_UD.shape)} must be ({rows_U.numel()}, {values_VD.shape[1]})"
        )
    check_indices(rows_U.view(1, -1), values_VD.shape[0])
    _impl(backend, values_VD.device).sparse_update_(
        optimizer,
        values_VD,
        state,
        rows_U.long(),
        grad_UD,
        lr=lr,
        eps=eps,
        betas=betas,
        weight_decay=weight_decay,
    )


class WeightedEmbeddingBag(torch.autograd.Function):
    """Bag forward; backward returns the scores' gradient and hands the rows' to a sink."""

    @staticmethod
    def forward(ctx, values_VD, idx_NK, scores_NK, grad_sink, backend):
        ctx.save_for_backward(values_VD, idx_NK, scores_NK)
        ctx.grad_sink = grad_sink
        ctx.backend = backend
        return bag_forward(values_VD, idx_NK, scores_NK, backend=backend).to(scores_NK.dtype)

    @staticmethod
    def backward(ctx, dy_ND):
        values_VD, idx_NK, scores_NK = ctx.saved_tensors
        dy_ND = dy_ND.contiguous()
        dscores = None
        if ctx.needs_input_grad[2]:
            dscores = bag_backward_scores(values_VD, idx_NK, dy_ND, backend=ctx.backend)
            dscores = dscores.to(scores_NK.dtype)
        if ctx.grad_sink is not None:
            ctx.grad_sink(*bag_backward_values(idx_NK, scores_NK, dy_ND, backend=ctx.backend))
        return None, None, dscores, None, None


def weighted_embedding_bag(
    values_VD: torch.Tensor,
    idx_NK: torch.Tensor,
    scores_NK: torch.Tensor,
    grad_sink: GradSink | None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable in ``scores_NK``; the sparse value gradient goes to ``grad_sink``."""
    return WeightedEmbeddingBag.apply(values_VD, idx_NK, scores_NK, grad_sink, backend)
