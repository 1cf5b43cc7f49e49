"""The product-key memory layer (Memory+), a plain single-device ``nn.Module``.

A token's query, split per head into two halves, scores two sets of ``n_keys`` half
keys; the top-``knn`` of each half combine into ``knn**2`` candidates of which the
top-``knn`` are kept (the cartesian product trick), indexing a table of ``n_keys**2``
rows. The output is the softmax-weighted sum of those rows, summed over heads, then
(Memory+) ``W_o(y * silu(W_1 x))`` and an optional sigmoid gate.

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

from memdist.config import MemoryConfig, validate_memory
from memdist.errors import ConfigError
from memdist.values import ValueTable


def product_key_topk(
    q_NH2Q: torch.Tensor, keys_H2CQ: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` rows of the ``C*C`` product keys for each token and head.

    Returns raw scores ``(N, H, K)`` and row indices ``(N, H, K)`` (int64, ``i1*C + i2``).
    """
    n_keys = keys_H2CQ.shape[2]
    s1_NHC = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 0], keys_H2CQ[:, 0])
    s2_NHC = torch.einsum("nhq,hcq->nhc", q_NH2Q[:, :, 1], keys_H2CQ[:, 1])
    top1_NHK, i1_NHK = s1_NHC.topk(knn, dim=-1)
    top2_NHK, i2_NHK = s2_NHC.topk(knn, dim=-1)
    # Scores of the knn x knn candidate pairs; the best knn of them are the result.
    pair_NHKK = top1_NHK.unsqueeze(-1) + top2_NHK.unsqueeze(-2)
    best_NHK, flat_NHK = pair_NHKK.flatten(-2).topk(knn, dim=-1)
    r1 = torch.gather(i1_NHK, -1, torch.div(flat_NHK, knn, rounding_mode="floor"))
    r2 = torch.gather(i2_NHK, -1, flat_NHK % knn)
    return best_NHK, r1.long() * n_keys + r2.long()


class MemoryLayer(nn.Module):
    """Product-key memory replacing a block's FFN; values come from ``table``."""

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
        self.query_norm = nn.RMSNorm(half) if cfg.qk_norm else None
        if cfg.swilu:
            self.w1 = nn.Linear(dim, v_dim, bias=False)
            self.wo = nn.Linear(v_dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1) if cfg.gate else None
        # Not a submodule: the table's rows are not parameters of the backbone.
        self._table = table
        self.usage_V: torch.Tensor | None = None  # read counts, when statistics are on
        self.reset_parameters()

    @property
    def table(self) -> ValueTable:
        return self._table

    def reset_parameters(self, std: float = 0.02) -> None:
        bound = self.cfg.k_dim**-0.5  # the paper: keys uniform in +-1/sqrt(k_dim)
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.normal_(self.query_proj.weight, std=std)
        if self.cfg.swilu:
            nn.init.normal_(self.w1.weight, std=std)
            nn.init.normal_(self.wo.weight, std=std)
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()

    def select(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(N, H*K)`` and softmax scores ``(N, H*K)`` for each token."""
        cfg = self.cfg
        n = x_ND.shape[0]
        q_NH2Q = self.query_proj(x_ND).view(n, cfg.heads, 2, cfg.k_dim // 2)
        keys_H2CQ: torch.Tensor = self.keys
        if self.query_norm is not None:
            q_NH2Q = self.query_norm(q_NH2Q)
            keys_H2CQ = F.normalize(keys_H2CQ, dim=-1)
        raw_NHK, idx_NHK = product_key_topk(q_NH2Q, keys_H2CQ, cfg.knn)
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
            self.usage_V += torch.bincount(idx_NK.flatten(), minlength=self.usage_V.numel()).to(
                self.usage_V.device
            )
        # One bag of H*K rows per token: summing the heads' pooled outputs. A table that
        # can (remote shards) starts the lookup now, so the branches below overlap with it.
        start = getattr(self._table, "lookup_async", None)
        pending = start(idx_NK, scores_NK) if start is not None else None
        up_NE = F.silu(self.w1(x_ND)) if self.cfg.swilu else None
        gate_N1 = torch.sigmoid(self.gate(x_ND)) if self.gate is not None else None
        y_NE = pending.wait() if pending is not None else self._table.lookup(idx_NK, scores_NK)
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
