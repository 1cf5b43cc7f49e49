"""The value optimizer's settings, built once from the run config and passed down as is.

Tables, shard servers and row caches hold one ``OptimizerSpec`` and hand it to
``memdist.kernels.sparse_update_``; nothing between the config and the kernels
spells out its fields again. ``grad_clip`` is applied by the table that owns the
gradient (over every shard and worker), not by the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from memdist.errors import ConfigError

OPTIMIZERS = ("sgd", "adagrad", "adam")


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """``sgd``, row-wise ``adagrad`` or lazy ``adam`` with decoupled weight decay; a
    ``grad_clip`` (max norm of the whole table's gradient per step) or None."""

    name: str = "adam"
    lr: float = 1e-3
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"value optimizer {self.name!r} must be one of {OPTIMIZERS}")
        if not self.lr >= 0:
            raise ConfigError(f"learning rate lr={self.lr} must be >= 0")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.name != "sgd" and not self.eps > 0:
            raise ConfigError(f"eps={self.eps} must be > 0 for {self.name}")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"adam betas={self.betas} must be two numbers in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip={self.grad_clip} must be > 0 or None (off)")
        # Plain floats, so the spec pickles small and compares equal across processes.
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
