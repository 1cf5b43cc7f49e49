"""A small Llama-style decoder (RMSNorm, RoPE, SwiGLU, causal SDPA) with memory layers.

Single-device model code: no process groups, Ray or DeepSpeed in here. Blocks named
in ``cfg.memory.layers`` use a ``MemoryLayer`` instead of their FFN; the value
tables they read are passed in (``tables[i]`` for the i-th memory block), so the
code that assembles a run decides where values live. ``flops_per_token`` counts
the forward cost so that memory and dense configs can be matched.

Every module initialises its own parameters in ``reset_parameters`` and a parent
calls its children's, once each: a generic walk over ``modules()`` would reach a
memory layer's linears after the layer and undo its init (the gate's zeros).

Letters: B batch, T time, D width, H attention heads, S head width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memdist.config import ModelConfig
from memdist.errors import ConfigError, ShapeError
from memdist.memory import MemoryLayer
from memdist.table import ValueTable


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, S/2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles_TS = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_TS.cos(), angles_TS.sin()


def apply_rope(x_BHTS: torch.Tensor, cos_TS: torch.Tensor, sin_TS: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTS.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos_TS - x2 * sin_TS, x1 * sin_TS + x2 * cos_TS), dim=-1)
    return out.flatten(-2).to(x_BHTS.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.normal_(self.out.weight, std=out_std)

    def forward(
        self, x_BTD: torch.Tensor, cos_TS: torch.Tensor, sin_TS: torch.Tensor
    ) -> torch.Tensor:
        b, t, d = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        q_BHTS = apply_rope(q.transpose(1, 2), cos_TS, sin_TS)
        k_BHTS = apply_rope(k.transpose(1, 2), cos_TS, sin_TS)
        y_BHTS = F.scaled_dot_product_attention(q_BHTS, k_BHTS, v.transpose(1, 2), is_causal=True)
        return self.out(y_BHTS.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def reset_parameters(self, std: float) -> None:
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: SwiGLU | MemoryLayer) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn: SwiGLU | MemoryLayer = ffn

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attn.reset_parameters(std, out_std)
        self.ffn.reset_parameters(std)

    def forward(self, x: torch.Tensor, cos_TS: torch.Tensor, sin_TS: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos_TS, sin_TS)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM; memory blocks read the given value tables."""

    def __init__(self, cfg: ModelConfig, tables: Sequence[ValueTable] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        mem_layers = cfg.memory.layers if cfg.memory is not None else []
        tables = list(tables or [])
        if len(tables) != len(mem_layers):
            raise ConfigError(
                f"{len(tables)} value tables given for memory blocks {mem_layers}: "
                "pass one table per memory block (the same object to share one)"
            )
        table_of = dict(zip(mem_layers, tables, strict=True))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        blocks = []
        for i in range(cfg.n_layers):
            if i in table_of:
                assert cfg.memory is not None
                ffn: SwiGLU | MemoryLayer = MemoryLayer(cfg.dim, cfg.memory, table_of[i])
            else:
                ffn = SwiGLU(cfg.dim, cfg.hidden)
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter once: normal(init_std) weights, unit norm gains,
        and each memory layer as its own ``reset_parameters`` says."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        self.norm.reset_parameters()
        # Scaled init of the residual projections (GPT-2 style) keeps early steps stable.
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        for block in self.block_list():
            block.reset_parameters(std, out_std)

    def block_list(self) -> list[Block]:
        return [b for b in self.blocks if isinstance(b, Block)]

    def memory_layers(self) -> list[MemoryLayer]:
        return [b.ffn for b in self.block_list() if isinstance(b.ffn, MemoryLayer)]

    def _embed(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = tokens_BT.shape[1]
        if t > self.cfg.max_seq_len:
            raise ShapeError(
                f"sequence of {t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        return self.tok_emb(tokens_BT), self.rope_cos[:t], self.rope_sin[:t]  # type: ignore[index]

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for the next token at each position."""
        x, cos_TS, sin_TS = self._embed(tokens_BT)
        for block in self.blocks:
            x = block(x, cos_TS, sin_TS)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def first_memory_rows(self, tokens_BT: torch.Tensor) -> tuple[MemoryLayer, torch.Tensor] | None:
        """The first memory layer and the row indices ``(N, H*K)`` it will read for these
        tokens: the forward up to that layer's top-k, without the lookup. Later memory
        layers' queries depend on its output, so only the first one can be known early."""
        x, cos_TS, sin_TS = self._embed(tokens_BT)
        for block in self.block_list():
            if isinstance(block.ffn, MemoryLayer):
                x = x + block.attn(block.attn_norm(x), cos_TS, sin_TS)
                return block.ffn, block.ffn(block.ffn_norm(x), rows_only=True)
            x = block(x, cos_TS, sin_TS)
        return None


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward multiply-add FLOPs (x2) per token, by part; training costs about 3x forward.

    Attention scores use the mean causal context, ``seq_len / 2``. The memory layer's
    cost does not depend on the number of rows, only on heads, n_keys, knn and widths.
    Norms (RMSNorm, the memory's qk-norm), softmaxes and top-k are left out, as
    elementwise work next to the matmuls; the qk-norm's key side runs once per batch,
    not per token.
    """
    d, h = cfg.dim, cfg.hidden
    ctx = seq_len / 2
    attn = 2 * d * 3 * d + 2 * d * d + 2 * 2 * ctx * d
    ffn = 2 * 3 * d * h
    memory = 0.0
    if cfg.memory is not None:
        m = cfg.memory
        e = m.v_dim if m.v_dim is not None else d
        memory = (
            2 * d * m.heads * m.k_dim  # query projection
            + 2 * m.heads * m.n_keys * m.k_dim  # both half-key sets
            + 2 * m.heads * m.knn * e  # weighted sum of the selected rows
            + (2 * 2 * d * e + e if m.swilu else 0)
            + (2 * d if m.gate else 0)
        )
    n_mem = len(cfg.memory.layers) if cfg.memory is not None else 0
    total = cfg.n_layers * attn + (cfg.n_layers - n_mem) * ffn + n_mem * memory
    total += 2 * d * cfg.vocab_size
    return {"forward": total, "train": 3 * total, "memory_layer": memory, "ffn": ffn}
