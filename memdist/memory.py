"""The product-key memory layer (Memory+), a plain single-device ``nn.Module``.

A token's query, split per head into two halves, scores two sets of ``n_keys`` half
keys; the top-``knn`` of each half combine into ``knn**2`` candidates of which the
top-``knn`` are kept (the cartesian product trick), indexing a table of ``n_keys**2``
rows. The output is the softmax-weighted sum of those rows, summed over heads, then
(Memory+) ``W_o(y * silu(W_1 x))`` and an optional sigmoid gate.

qk-norm (``cfg.qk_norm``), symmetric as in Chameleon's: for head h and half i,

    qn = g_q[h,i] * rms(q[h,i]),   kn_c = g_k[h,i] * rms(k[h,i,c]),   s_c = <qn, kn_c> / sqrt(Q)

with ``rms(v) = v / sqrt(mean(v**2) + eps)`` and learned elementwise gains of width Q,
one per head and half for queries and for keys (initialised to 1). Each (head, half)
has its own key set, top-k and share of the softmax logits, so its own gains let it
learn its own temperature; one gain per half shared by the heads would tie all heads
to one. Only the product ``g_q * g_k`` enters a score, so the two gains are redundant
as a function but keep the form symmetric. Dividing by sqrt(Q) as in scaled
dot-product attention makes the unit-gain scores those of RMS-normalised queries
against L2-normalised keys: ``|s_c| <= sqrt(Q)`` at init, and the temperature is then
learned through the gains instead of being fixed by the normalisation.

The layer does not own its values: it is given a ``ValueTable`` and only calls its
``lookup``. Several layers share one table by being given the same object.

Letters: B batch, T time, D model width, N = B*T tokens, H memory heads,
C = n_keys (keys per half), Q = k_dim // 2 (half query width), K = knn,
E = v_dim (value row width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memdist import kernels
from memdist.config import MemoryConfig, validate_memory
from memdist.errors import ConfigError
from memdist.table import ValueTable


def product_key_topk(
    q1_NHQ: torch.Tensor,
    q2_NHQ: torch.Tensor,
    keys_H2CQ: torch.Tensor,
    knn: int,
    *,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` rows of the ``C*C`` product keys for each token and head, from the
    queries' two halves.

    Returns raw scores ``(N, H, K)`` and row indices ``(N, H, K)`` (int64, ``i1*C + i2``).
    ``backend`` picks the kernels (``memdist.kernels.half_key_topk``, ``product_pairs``).
    """
    top1_NHK, i1_NHK = kernels.half_key_topk(q1_NHQ, keys_H2CQ[:, 0], knn, backend=backend)
    top2_NHK, i2_NHK = kernels.half_key_topk(q2_NHQ, keys_H2CQ[:, 1], knn, backend=backend)
    # The best knn of the knn x knn candidate pairs.
    n_keys = keys_H2CQ.shape[2]
    return kernels.product_pairs(top1_NHK, i1_NHK, top2_NHK, i2_NHK, n_keys, backend=backend)


class GainRMSNorm(nn.Module):
    """RMS normalisation over the last dim (Q) times a learned gain of any broadcastable
    ``shape``, e.g. one gain vector per (head, half).

    The gain is stored flat (one dim, like ``nn.RMSNorm``'s weight) so optimizer rules
    that treat 1-D parameters as norm gains (no weight decay) apply to it; decaying a
    gain toward zero would lower the scores' temperature.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.weight = nn.Parameter(torch.empty(int(torch.Size(shape).numel())))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eps None: the dtype's machine epsilon, as nn.RMSNorm.
        return F.rms_norm(x, (self.shape[-1],)) * self.weight.view(self.shape)


class QueryNorm(GainRMSNorm):
    """The queries' qk-norm times ``scale``, split into the halves the two key sets score
    (``memdist.kernels.query_norm``); one gain vector per (head, half)."""

    def __init__(self, shape: tuple[int, int, int], scale: float, backend: str) -> None:
        super().__init__(shape)
        self.scale = scale
        self.backend = backend

    def forward(self, q_NH2Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return kernels.query_norm(
            q_NH2Q, self.weight.view(self.shape), self.scale, backend=self.backend
        )


class MemoryLayer(nn.Module):
    """Product-key memory replacing a block's FFN; values come from ``table``.

    With ``usage_V`` set (a long tensor of ``n_keys**2`` counts) each forward adds the
    rows read at positions ``t >= usage_from_t``: a caller that re-runs a prefix it has
    already counted (greedy decoding without a KV cache) moves ``usage_from_t`` past it,
    since a causal model's reads at a position depend only on its prefix.
    """

    def __init__(self, dim: int, cfg: MemoryConfig, table: ValueTable) -> None:
        super().__init__()
        validate_memory(cfg, dim)
        v_dim = cfg.v_dim if cfg.v_dim is not None else dim
        if table.num_rows != cfg.rows or table.dim != v_dim:
            raise ConfigError(
                f"value table is {table.num_rows} x {table.dim} but the memory config needs "
                f"n_keys**2 = {cfg.rows} rows of v_dim = {v_dim}"
            )
        self.cfg = cfg
        self.dim = dim
        self.v_dim = v_dim
        half = cfg.k_dim // 2
        self.query_proj = nn.Linear(dim, cfg.heads * cfg.k_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, half))
        # The scores' 1/sqrt(Q), folded into the queries: a positive factor on every
        # score, so it commutes with the dot products and the top-k.
        self.query_norm = (
            QueryNorm((cfg.heads, 2, half), half**-0.5, cfg.backend) if cfg.qk_norm else None
        )
        self.key_norm = GainRMSNorm((cfg.heads, 2, 1, half)) if cfg.qk_norm else None
        if cfg.swilu:
            self.w1 = nn.Linear(dim, v_dim, bias=False)
            self.wo = nn.Linear(v_dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1) if cfg.gate else None
        # Not a submodule: the table's rows are not parameters of the backbone.
        self._table = table
        self.usage_V: torch.Tensor | None = None  # read counts, when statistics are on
        self.usage_from_t = 0  # first position whose reads are counted
        self.reset_parameters()

    @property
    def table(self) -> ValueTable:
        return self._table

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise every parameter of the layer (callers must not re-init its parts)."""
        bound = self.cfg.k_dim**-0.5  # the paper: keys uniform in +-1/sqrt(k_dim)
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.normal_(self.query_proj.weight, std=std)
        if self.cfg.swilu:
            nn.init.normal_(self.w1.weight, std=std)
            nn.init.normal_(self.wo.weight, std=std)
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if self.query_norm is not None and self.key_norm is not None:
            self.query_norm.reset_parameters()
            self.key_norm.reset_parameters()

    def select(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(N, H*K)`` and softmax scores ``(N, H*K)`` for each token."""
        cfg = self.cfg
        n = x_ND.shape[0]
        q_NH2Q = self.query_proj(x_ND).view(n, cfg.heads, 2, cfg.k_dim // 2)
        keys_H2CQ: torch.Tensor = self.keys
        if self.query_norm is not None and self.key_norm is not None:
            q1_NHQ, q2_NHQ = self.query_norm(q_NH2Q)
            keys_H2CQ = self.key_norm(keys_H2CQ)
        else:
            q1_NHQ, q2_NHQ = q_NH2Q[:, :, 0], q_NH2Q[:, :, 1]
        raw_NHK, idx_NHK = product_key_topk(q1_NHQ, q2_NHQ, keys_H2CQ, cfg.knn, backend=cfg.backend)
        scores_NHK = torch.softmax(raw_NHK.float(), dim=-1).to(x_ND.dtype)
        return idx_NHK.reshape(n, -1), scores_NHK.reshape(n, -1)

    def forward(self, x_BTD: torch.Tensor, *, rows_only: bool = False) -> torch.Tensor:
        """Output ``(B, T, D)``; with ``rows_only`` the row indices ``(N, H*K)`` it would
        read, without the lookup (called as a module, so wrappers that gather parameters
        before a forward, like ZeRO-3's, do so)."""
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        idx_NK, scores_NK = self.select(x_ND)
        if rows_only:
            return idx_NK
        if self.usage_V is not None:
            counted_BTK = idx_NK.view(b, t, -1)[:, self.usage_from_t :]
            self.usage_V += torch.bincount(
                counted_BTK.flatten(), minlength=self.usage_V.numel()
            ).to(self.usage_V.device)
        if torch.is_grad_enabled() and not scores_NK.requires_grad:
            # Nothing before the lookup trains (a frozen backbone): the scores enter as a
            # leaf asking for a gradient, so the lookup's backward still runs and hands
            # the rows theirs.
            scores_NK = scores_NK.detach().requires_grad_()
        # One bag of H*K rows per token: summing the heads' pooled outputs. A table that
        # can (remote shards) starts the lookup now, so the branches below overlap with it.
        pending = self._table.lookup_async(idx_NK, scores_NK)
        up_NE = F.silu(self.w1(x_ND)) if self.cfg.swilu else None
        gate_N1 = torch.sigmoid(self.gate(x_ND)) if self.gate is not None else None
        y_NE = pending.wait()
        if up_NE is not None:
            y_NE = self.wo(y_NE * up_NE)
        if gate_N1 is not None:
            y_NE = y_NE * gate_N1
        return y_NE.view(b, t, d)


def key_usage(counts_V: torch.Tensor) -> dict[str, float]:
    """Fraction of rows read and KL(read distribution || uniform) from read counts."""
    total = float(counts_V.sum())
    rows = counts_V.numel()
    if total == 0:
        return {"key_usage": 0.0, "key_kl": 0.0, "reads": 0.0}
    p = counts_V.double() / total
    nz = p[p > 0]
    kl = float((nz * (nz * rows).log()).sum())  # sum p log(p / (1/rows))
    return {"key_usage": float((counts_V > 0).double().mean()), "key_kl": kl, "reads": total}
