"""Kernels for memory lookups: weighted embedding bag, its backwards, sparse optimizers.

Imported as ``memdist.kernels``; depends only on torch, triton and ``memdist.errors``.
Triton is imported on first use of the Triton backend, so importing this package is
cheap on a machine without a GPU. Every public function takes ``backend``:

- ``"auto"``: Triton when the tensors are on CUDA; on CPU the C++ kernels, or the
  torch path where they cannot be built (no C++ compiler: a warning says so);
- ``"cpp"``: C++ CPU kernels (``cpp_ops``, built on first use by torch's cpp_extension)
  for the backwards and the sparse update, fp32 tables; the forward is the torch path's;
- ``"triton"``: the Triton kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``
  in the environment before the kernels are first imported);
- ``"torch"``: vectorised torch ops (``torch_ops``);
- ``"reference"``: plain, slow, obviously correct torch (``reference``).

Letters: N bags (tokens), K rows per bag (heads * knn), V table rows, D row width,
U unique rows touched.

- forward ``y_ND[n] = sum_k scores_NK[n, k] * values_VD[idx_NK[n, k]]`` (fp32 out)
- scores backward ``dscores_NK[n, k] = <dy_ND[n], values_VD[idx_NK[n, k]]>``
- values backward: sorted unique ``rows_U`` and ``grad_UD[u] = sum over (n, k) with
  idx_NK[n, k] == rows_U[u] of scores_NK[n, k] * dy_ND[n]``, summed in flat position
  order through a reverse index: deterministic, no float atomics.
- entries (``entries_forward``, ``entries_backward``): the same over bags of any length,
  E entries in all, bag n being entries ``[offsets_N1[n], offsets_N1[n + 1])`` (a row-wise
  shard's own entries of each bag), dscores one per entry.
- sparse update of the touched rows, in place (state fp32, values fp32 or bf16,
  computed in fp32): ``sgd`` w -= lr g; ``adagrad`` (row-wise) s += mean_d(g^2),
  w -= lr g / (sqrt(s) + eps); ``adam`` (lazy, per-row step count t) with bias
  corrections. Decoupled weight decay w -= lr wd w, when set, shrinks touched rows only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import torch

from memdist.errors import ConfigError, DataError, IndexOutOfRangeError, ShapeError
from memdist.kernels import cpp_ops, reference, torch_ops
from memdist.kernels.spec import OPTIMIZERS, OptimizerSpec

__all__ = [
    "BACKENDS",
    "OPTIMIZERS",
    "OptimizerSpec",
    "GradSink",
    "WeightedEmbeddingBag",
    "bag_backward",
    "bag_backward_scores",
    "bag_backward_values",
    "bag_forward",
    "best_pairs",
    "check_indices",
    "entries_backward",
    "entries_forward",
    "half_key_topk",
    "init_optimizer_state",
    "product_pairs",
    "query_norm",
    "sparse_update_",
    "sum_squares",
    "weighted_embedding_bag",
]

BACKENDS = ("auto", "cpp", "torch", "triton", "reference")
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
GradSink = Callable[[torch.Tensor, torch.Tensor], None]


# --- backend selection -------------------------------------------------------------


def _resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpp" if device.type == "cpu" and cpp_ops.available() else "torch"
    if backend == "triton" and device.type != "cuda":
        _require_interpreter(device)
    if backend == "cpp" and device.type != "cpu":
        raise ConfigError(f"kernel backend='cpp' runs on CPU tensors, got {device.type} tensors")
    return backend


def _require_interpreter(device: torch.device) -> None:
    # Compiled Triton kernels only run on GPU tensors; the interpreter runs them on the
    # CPU, but only if it was switched on before triton decorated the kernels.
    from memdist.kernels import triton_bag

    if not triton_bag.INTERPRETED:
        raise ConfigError(
            f"backend='triton' on {device.type} tensors needs the Triton interpreter: set "
            f"TRITON_INTERPRET=1 before memdist.kernels.triton_bag is first imported "
            f"(now TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}), or use CUDA tensors"
        )


_CPU_OPS = {"cpp": cpp_ops, "torch": torch_ops, "reference": reference}


def _bag_ops(backend: str, device: torch.device) -> ModuleType:
    name = _resolve(backend, device)
    if name == "triton":
        from memdist.kernels import triton_bag

        return triton_bag
    return _CPU_OPS[name]


def _optim_ops(backend: str, device: torch.device) -> ModuleType:
    name = _resolve(backend, device)
    if name == "triton":
        from memdist.kernels import triton_optim

        return triton_optim
    return _CPU_OPS[name]


# --- argument checks ---------------------------------------------------------------


def check_indices(idx_NK: torch.Tensor, num_rows: int) -> None:
    """Raise ``IndexOutOfRangeError`` naming the first index outside ``[0, num_rows)``.

    One min/max reduction when every index is fine; the search for the offending
    position only runs on failure. Works for index tensors of any shape.
    """
    if idx_NK.numel() == 0:
        return
    lo, hi = torch.aminmax(idx_NK)
    if int(lo) >= 0 and int(hi) < num_rows:
        return
    position = tuple(((idx_NK < 0) | (idx_NK >= num_rows)).nonzero()[0].tolist())
    value = int(idx_NK[position])
    raise IndexOutOfRangeError(
        f"index {value} at position {position} is outside the value table of {num_rows} rows "
        f"(indices must be in [0, {num_rows}))"
    )


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_values(values_VD: torch.Tensor) -> None:
    if values_VD.ndim != 2:
        raise ShapeError(f"values must be 2-D (rows, dim), got shape {_shape(values_VD)}")
    if values_VD.dtype not in VALUE_DTYPES:
        raise ShapeError(f"values dtype {values_VD.dtype} must be one of {VALUE_DTYPES}")


def _check_idx(idx_NK: torch.Tensor) -> None:
    if idx_NK.ndim != 2 or idx_NK.dtype not in INDEX_DTYPES:
        raise ShapeError(
            f"indices must be a 2-D int64/int32 tensor (bags, bag size), "
            f"got {idx_NK.dtype} of shape {_shape(idx_NK)}"
        )


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ShapeError(f"{name} must be floating point, got {t.dtype}")


def _check_scores(idx_NK: torch.Tensor, scores_NK: torch.Tensor) -> None:
    if scores_NK.shape != idx_NK.shape:
        raise ShapeError(
            f"scores shape {_shape(scores_NK)} must equal indices shape {_shape(idx_NK)}"
        )
    _check_float("scores", scores_NK)


def _check_dy(dy_ND: torch.Tensor, n: int, d: int | None) -> None:
    expect = f"({n}, {'D' if d is None else d})"
    if dy_ND.ndim != 2 or dy_ND.shape[0] != n or (d is not None and dy_ND.shape[1] != d):
        raise ShapeError(f"output gradient has shape {_shape(dy_ND)}, expected {expect}")
    _check_float("output gradient", dy_ND)


def _check_devices(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(dev != first for dev in devices.values()):
        found = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ShapeError(f"tensors must share one device, got {found}")
    return first


# --- bag forward and backwards ---------------------------------------------------


def bag_forward(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, scores_NK: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Weighted sum of rows per bag, accumulated and returned in fp32, shape (N, D)."""
    _check_values(values_VD)
    _check_idx(idx_NK)
    _check_scores(idx_NK, scores_NK)
    device = _check_devices(values=values_VD, indices=idx_NK, scores=scores_NK)
    ops = _bag_ops(backend, device)
    check_indices(idx_NK, values_VD.shape[0])
    n, d = idx_NK.shape[0], values_VD.shape[1]
    if idx_NK.numel() == 0:
        return torch.zeros(n, d, dtype=torch.float32, device=device)
    return ops.bag_forward(values_VD, idx_NK.long(), scores_NK)


def bag_backward_scores(
    values_VD: torch.Tensor, idx_NK: torch.Tensor, dy_ND: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Gradient of the bag output with respect to the scores, fp32, shape (N, K)."""
    _check_values(values_VD)
    _check_idx(idx_NK)
    _check_dy(dy_ND, idx_NK.shape[0], values_VD.shape[1])
    device = _check_devices(values=values_VD, indices=idx_NK, output_gradient=dy_ND)
    ops = _bag_ops(backend, device)
    # The kernels read values_VD[idx], so an index outside the table must not get there.
    check_indices(idx_NK, values_VD.shape[0])
    if idx_NK.numel() == 0:
        return torch.zeros(idx_NK.shape, dtype=torch.float32, device=device)
    return ops.bag_backward_scores(values_VD, idx_NK.long(), dy_ND)


def bag_backward_values(
    idx_NK: torch.Tensor, scores_NK: torch.Tensor, dy_ND: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse table gradient: sorted unique ``rows_U`` (int64) and fp32 ``grad_UD``."""
    _check_idx(idx_NK)
    _check_scores(idx_NK, scores_NK)
    _check_dy(dy_ND, idx_NK.shape[0], None)
    device = _check_devices(indices=idx_NK, scores=scores_NK, output_gradient=dy_ND)
    ops = _bag_ops(backend, device)
    if idx_NK.numel() == 0:
        rows_U = torch.zeros(0, dtype=torch.int64, device=device)
        return rows_U, torch.zeros(0, dy_ND.shape[1], dtype=torch.float32, device=device)
    return ops.bag_backward_values(idx_NK.long(), scores_NK, dy_ND)


def bag_backward(
    values_VD: torch.Tensor,
    idx_NK: torch.Tensor,
    scores_NK: torch.Tensor,
    dy_ND: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both backwards: ``bag_backward_scores``' dscores and ``bag_backward_values``' rows
    and gradient, the same results. The ``cpp`` backend makes one pass over the touched
    rows, reading each row once instead of once per position."""
    _check_values(values_VD)
    _check_idx(idx_NK)
    _check_scores(idx_NK, scores_NK)
    _check_dy(dy_ND, idx_NK.shape[0], values_VD.shape[1])
    device = _check_devices(
        values=values_VD, indices=idx_NK, scores=scores_NK, output_gradient=dy_ND
    )
    name = _resolve(backend, device)
    check_indices(idx_NK, values_VD.shape[0])
    if name != "cpp" or idx_NK.numel() == 0:
        dscores_NK = bag_backward_scores(values_VD, idx_NK, dy_ND, backend=backend)
        return dscores_NK, *bag_backward_values(idx_NK, scores_NK, dy_ND, backend=backend)
    return cpp_ops.bag_backward(values_VD, idx_NK.long(), scores_NK, dy_ND)


# --- bags of any length (a row-wise shard's own entries) ----------------------------


def _check_entries(idx_E: torch.Tensor, scores_E: torch.Tensor, offsets_N1: torch.Tensor) -> None:
    if idx_E.ndim != 1 or idx_E.dtype not in INDEX_DTYPES:
        raise ShapeError(
            f"entries' indices must be a 1-D int64/int32 tensor, got {idx_E.dtype} of shape "
            f"{_shape(idx_E)}"
        )
    _check_scores(idx_E, scores_E)
    if offsets_N1.ndim != 1 or offsets_N1.dtype != torch.int64 or offsets_N1.numel() < 1:
        raise ShapeError(
            f"bag offsets must be a non-empty 1-D int64 tensor (bags + 1), got "
            f"{offsets_N1.dtype} of shape {_shape(offsets_N1)}"
        )
    first, last = int(offsets_N1[0]), int(offsets_N1[-1])
    if first != 0 or last != idx_E.numel() or bool((offsets_N1.diff() < 0).any()):
        raise ShapeError(
            f"bag offsets must rise from 0 to the {idx_E.numel()} entries, got {first} .. "
            f"{last}" + (" (falling somewhere)" if first == 0 and last == idx_E.numel() else "")
        )


def _padded(
    idx_E: torch.Tensor, scores_E: torch.Tensor, offsets_N1: torch.Tensor, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries as N bags of the longest bag's length (idx ``pad``, score 0 after each
    bag's own), for the backends whose kernels take bags of one length; and where each
    entry went in the flat N x K positions. Entries keep their order, so every sum adds
    the same terms in the same order."""
    n, e = offsets_N1.numel() - 1, idx_E.numel()
    counts_N = offsets_N1.diff()
    k = int(counts_N.max()) if n else 0
    bag_E = torch.repeat_interleave(torch.arange(n, device=idx_E.device), counts_N, output_size=e)
    flat_E = bag_E * k + torch.arange(e, device=idx_E.device) - offsets_N1[bag_E]
    idx_NK = torch.full((n * k,), pad, dtype=torch.int64, device=idx_E.device)
    scores_NK = torch.zeros(n * k, dtype=scores_E.dtype, device=idx_E.device)
    idx_NK[flat_E] = idx_E.long()
    scores_NK[flat_E] = scores_E
    return idx_NK.view(n, k), scores_NK.view(n, k), flat_E


def _native_entries(backend: str, values_VD: torch.Tensor) -> bool:
    """Whether the C++ kernels take these bags as they are (else they are padded)."""
    return (
        _resolve(backend, values_VD.device) == "cpp"
        and values_VD.dtype == torch.float32
        and values_VD.is_contiguous()
    )


def entries_forward(
    values_VD: torch.Tensor,
    idx_E: torch.Tensor,
    scores_E: torch.Tensor,
    offsets_N1: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``bag_forward`` over bags of any length: ``y_ND[n]`` sums entries
    ``[offsets_N1[n], offsets_N1[n + 1])`` of ``scores_E * values_VD[idx_E]`` in order."""
    _check_values(values_VD)
    _check_entries(idx_E, scores_E, offsets_N1)
    _check_devices(values=values_VD, indices=idx_E, scores=scores_E, offsets=offsets_N1)
    check_indices(idx_E, values_VD.shape[0])
    if _native_entries(backend, values_VD) and idx_E.numel():
        return cpp_ops.entries_forward(values_VD, idx_E.long(), scores_E, offsets_N1)
    idx_NK, scores_NK, _ = _padded(idx_E, scores_E, offsets_N1, pad=0)
    return bag_forward(values_VD, idx_NK, scores_NK, backend=backend)


def entries_backward(
    values_VD: torch.Tensor,
    idx_E: torch.Tensor,
    scores_E: torch.Tensor,
    offsets_N1: torch.Tensor,
    dy_ND: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bag_backward`` of ``entries_forward``: ``dscores_E`` (fp32, one per entry), sorted
    unique ``rows_U`` and ``grad_UD``, each row's contributions summed in entry order."""
    _check_values(values_VD)
    _check_entries(idx_E, scores_E, offsets_N1)
    _check_dy(dy_ND, offsets_N1.numel() - 1, values_VD.shape[1])
    _check_devices(values=values_VD, indices=idx_E, scores=scores_E, offsets=offsets_N1,
                   output_gradient=dy_ND)  # fmt: skip
    check_indices(idx_E, values_VD.shape[0])
    if _native_entries(backend, values_VD) and idx_E.numel():
        return cpp_ops.entries_backward(values_VD, idx_E.long(), scores_E, offsets_N1, dy_ND)
    # The padding points one past the table: its row's gradient is left out below, and
    # its scores (read at row 0) are dropped.
    outside = values_VD.shape[0]
    idx_NK, scores_NK, flat_E = _padded(idx_E, scores_E, offsets_N1, pad=outside)
    inside_NK = idx_NK.clamp(max=outside - 1) if outside else idx_NK
    dscores_NK = bag_backward_scores(values_VD, inside_NK, dy_ND, backend=backend)
    rows_U, grad_UD = bag_backward_values(idx_NK, scores_NK, dy_ND, backend=backend)
    if rows_U.numel() and int(rows_U[-1]) == outside:
        rows_U, grad_UD = rows_U[:-1], grad_UD[:-1]
    return dscores_NK.reshape(-1)[flat_E], rows_U, grad_UD


# --- product-key selection ---------------------------------------------------------


def half_key_topk(
    q_NHQ: torch.Tensor, keys_HCQ: torch.Tensor, knn: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` of one product-key half's scores ``s[n, h, c] = <q_NHQ[n, h],
    keys_HCQ[h, c]>``: values (N, H, knn), sorted descending, and int64 indices into C.

    Differentiable in ``q_NHQ`` and ``keys_HCQ`` (through the selected scores). The
    ``cpp`` backend never builds the (N, H, C) scores, which grow with sqrt(table rows);
    the others (``triton`` included: selection is not a Triton kernel) are einsum + topk.
    """
    if (
        q_NHQ.ndim != 3
        or keys_HCQ.ndim != 3
        or q_NHQ.shape[1] != keys_HCQ.shape[0]
        or (q_NHQ.shape[2] != keys_HCQ.shape[2])
    ):
        raise ShapeError(
            f"queries {_shape(q_NHQ)} and keys {_shape(keys_HCQ)} must be (N, H, Q) and (H, C, Q)"
        )
    _check_float("queries", q_NHQ)
    _check_float("keys", keys_HCQ)
    if not 1 <= knn <= keys_HCQ.shape[1]:
        raise ConfigError(f"knn={knn} must be in [1, {keys_HCQ.shape[1]}] (the keys per half)")
    device = _check_devices(queries=q_NHQ, keys=keys_HCQ)
    name = _resolve("torch" if backend == "triton" else backend, device)
    return _CPU_OPS["torch" if name == "triton" else name].half_key_topk(q_NHQ, keys_HCQ, knn)


def query_norm(
    q_NH2Q: torch.Tensor, gain_H2Q: torch.Tensor, scale: float, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The product-key queries' qk-norm: ``F.rms_norm(q_NH2Q) * gain_H2Q * scale`` (RMS
    over Q, eps the dtype's machine epsilon), returned as its two halves (N, H, Q).
    Differentiable in both tensors. The ``cpp`` backend makes each half contiguous in one
    pass (the torch path's views, elementwise ops and their backwards took ~5 ms of a
    ``small`` step)."""
    if q_NH2Q.ndim != 4 or q_NH2Q.shape[2] != 2 or gain_H2Q.shape != q_NH2Q.shape[1:]:
        raise ShapeError(
            f"queries {_shape(q_NH2Q)} and gains {_shape(gain_H2Q)} must be (N, H, 2, Q) "
            "and (H, 2, Q)"
        )
    _check_float("queries", q_NH2Q)
    device = _check_devices(queries=q_NH2Q, gains=gain_H2Q)
    name = _resolve("torch" if backend == "triton" else backend, device)
    return _CPU_OPS["torch" if name == "triton" else name].query_norm(q_NH2Q, gain_H2Q, scale)


def _pairs_backend(top1_NHK: torch.Tensor, top2_NHK: torch.Tensor, backend: str) -> str:
    """The checks of two top-knn lists; the CPU backend that ranks their pairs."""
    if top1_NHK.ndim != 3 or top1_NHK.shape != top2_NHK.shape:
        raise ShapeError(
            f"top-k lists {_shape(top1_NHK)} and {_shape(top2_NHK)} must both be (N, H, knn)"
        )
    _check_float("top-k scores", top1_NHK)
    device = _check_devices(top1=top1_NHK, top2=top2_NHK)
    name = _resolve("torch" if backend == "triton" else backend, device)
    return "torch" if name == "triton" else name


def best_pairs(
    top1_NHK: torch.Tensor, top2_NHK: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks ``(r1_NHK, r2_NHK)`` into two descending top-knn lists of the knn best sums
    ``top1[..., i] + top2[..., j]``, best first (int64, no gradient: gather the sums)."""
    return _CPU_OPS[_pairs_backend(top1_NHK, top2_NHK, backend)].best_pairs(top1_NHK, top2_NHK)


def product_pairs(
    top1_NHK: torch.Tensor,
    i1_NHK: torch.Tensor,
    top2_NHK: torch.Tensor,
    i2_NHK: torch.Tensor,
    n_keys: int,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The product keys' knn best: of the pairs of two halves' top-knn lists (scores
    ``top*_NHK`` sorted descending, key indices ``i*_NHK``), the ``best_pairs``' sums
    ``(N, H, knn)``, differentiable in both lists, and their rows ``i1 * n_keys + i2``
    (int64). The ``cpp`` backend does it in one pass, without the gathers."""
    if i1_NHK.shape != top1_NHK.shape or i2_NHK.shape != top2_NHK.shape:
        raise ShapeError(
            f"key indices {_shape(i1_NHK)} and {_shape(i2_NHK)} must have the shapes of "
            f"their top-k lists {_shape(top1_NHK)} and {_shape(top2_NHK)}"
        )
    name = _pairs_backend(top1_NHK, top2_NHK, backend)
    if name == "cpp" and top1_NHK.dtype == top2_NHK.dtype == torch.float32:
        return cpp_ops.product_pairs(top1_NHK, i1_NHK.long(), top2_NHK, i2_NHK.long(), n_keys)
    r1_NHK, r2_NHK = _CPU_OPS[name].best_pairs(top1_NHK.detach(), top2_NHK.detach())
    best_NHK = top1_NHK.gather(-1, r1_NHK) + top2_NHK.gather(-1, r2_NHK)
    return best_NHK, i1_NHK.gather(-1, r1_NHK) * n_keys + i2_NHK.gather(-1, r2_NHK)


# --- sparse optimizers -----------------------------------------------------------


def _state_spec(optimizer: str, num_rows: int, dim: int) -> dict[str, tuple[tuple, torch.dtype]]:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"value optimizer {optimizer!r} must be one of {OPTIMIZERS}")
    if optimizer == "adagrad":
        return {"sum_sq": ((num_rows,), torch.float32)}
    if optimizer == "adam":
        return {
            "exp_avg": ((num_rows, dim), torch.float32),
            "exp_avg_sq": ((num_rows, dim), torch.float32),
            "step": ((num_rows,), torch.int64),
        }
    return {}


def init_optimizer_state(
    optimizer: str, num_rows: int, dim: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Zeroed optimizer state for a (num_rows, dim) table: fp32 moments, int64 steps.

    ``sgd``: no state. ``adagrad``: ``sum_sq`` (V,). ``adam``: ``exp_avg`` and
    ``exp_avg_sq`` (V, D), ``step`` (V,) counting each row's own updates.
    """
    spec = _state_spec(optimizer, num_rows, dim)
    return {
        key: cpp_ops.empty_table(shape, dtype, device).zero_()
        for key, (shape, dtype) in spec.items()
    }


def _check_state(optimizer: str, values_VD: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    spec = _state_spec(optimizer, *values_VD.shape)
    missing = sorted(set(spec) - set(state))
    if missing:
        raise ConfigError(
            f"optimizer state for {optimizer!r} lacks {missing} (it needs {sorted(spec)}); "
            f"build it with init_optimizer_state"
        )
    for key, (shape, dtype) in spec.items():
        t = state[key]
        if _shape(t) != shape or t.dtype != dtype or t.device != values_VD.device:
            raise ShapeError(
                f"optimizer state {key!r} is {t.dtype} {_shape(t)} on {t.device}, "
                f"expected {dtype} {shape} on {values_VD.device}"
            )
        # The kernels update state rows in place through flat row offsets.
        if not t.is_contiguous():
            raise ShapeError(f"optimizer state {key!r} must be contiguous")


def _check_unique(rows_U: torch.Tensor) -> None:
    # The backward hands over sorted rows, so the common case costs one comparison.
    if rows_U.numel() < 2 or bool((rows_U[1:] > rows_U[:-1]).all()):
        return
    uniq, counts = torch.unique(rows_U, return_counts=True)
    if bool((counts > 1).any()):
        dup = int(uniq[counts > 1][0])
        raise DataError(
            f"row {dup} appears {int(counts[uniq == dup])} times in rows_U; a sparse update "
            f"needs unique rows (sum their gradients first)"
        )


def sparse_update_(
    spec: OptimizerSpec,
    values_VD: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows_U: torch.Tensor,
    grad_UD: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Apply ``spec``'s optimizer in place to ``values_VD[rows_U]`` and its state rows.

    ``rows_U`` must be unique (any order); rows not listed, and their state, are left
    bit-for-bit unchanged. ``state`` comes from ``init_optimizer_state``. ``grad_UD``
    is used as given: clipping is the table's business (``spec.grad_clip``).
    """
    _check_values(values_VD)
    _check_state(spec.name, values_VD, state)
    if rows_U.ndim != 1 or rows_U.dtype not in INDEX_DTYPES:
        raise ShapeError(
            f"rows_U must be a 1-D int64/int32 tensor, got {rows_U.dtype} {_shape(rows_U)}"
        )
    if _shape(grad_UD) != (rows_U.numel(), values_VD.shape[1]):
        raise ShapeError(
            f"gradient shape {_shape(grad_UD)} must be ({rows_U.numel()}, {values_VD.shape[1]})"
        )
    _check_float("gradient", grad_UD)
    device = _check_devices(values=values_VD, rows=rows_U, gradient=grad_UD)
    ops = _optim_ops(backend, device)
    check_indices(rows_U, values_VD.shape[0])
    _check_unique(rows_U)
    if rows_U.numel() == 0:
        return
    ops.sparse_update_(spec, values_VD, state, rows_U.long(), grad_UD)


def sum_squares(grad_UD: torch.Tensor, *, backend: str = "auto") -> float:
    """Squared norm of a (U, D) row gradient, summed in float64 (a gradient-clipping
    norm: shards' parts add up to one table's total to double precision). The same
    value for any thread count; ``cpp`` makes no float64 copy of the gradient."""
    if grad_UD.ndim != 2:
        raise ShapeError(f"gradient must be 2-D (rows, dim), got shape {_shape(grad_UD)}")
    _check_float("gradient", grad_UD)
    name = _resolve("torch" if backend == "triton" else backend, grad_UD.device)
    return _CPU_OPS["torch" if name == "triton" else name].sum_squares(grad_UD)


# --- autograd --------------------------------------------------------------------


class WeightedEmbeddingBag(torch.autograd.Function):
    """Bag forward; backward returns the scores' gradient and hands the rows' to a sink.

    The value table is not an autograd input: a 10^6..10^9-row table must never get a
    dense gradient. Its sparse gradient ``(rows_U, grad_UD)`` goes to ``grad_sink``,
    which the table's owner uses to feed its own sparse optimizer.
    """

    @staticmethod
    def forward(ctx, values_VD, idx_NK, scores_NK, grad_sink, backend):
        ctx.save_for_backward(values_VD, idx_NK, scores_NK)
        ctx.grad_sink = grad_sink
        ctx.backend = backend
        y_ND = bag_forward(values_VD, idx_NK, scores_NK, backend=backend)
        return y_ND.to(scores_NK.dtype)

    @staticmethod
    def backward(ctx, dy_ND):
        values_VD, idx_NK, scores_NK = ctx.saved_tensors
        dscores_NK = None
        if ctx.needs_input_grad[2] and ctx.grad_sink is not None:
            dscores_NK, rows_U, grad_UD = bag_backward(
                values_VD, idx_NK, scores_NK, dy_ND, backend=ctx.backend
            )
            ctx.grad_sink(rows_U, grad_UD)
            return None, None, dscores_NK.to(scores_NK.dtype), None, None
        if ctx.needs_input_grad[2]:
            dscores_NK = bag_backward_scores(values_VD, idx_NK, dy_ND, backend=ctx.backend)
            dscores_NK = dscores_NK.to(scores_NK.dtype)
        if ctx.grad_sink is not None:
            ctx.grad_sink(*bag_backward_values(idx_NK, scores_NK, dy_ND, backend=ctx.backend))
        return None, None, dscores_NK, None, None


def weighted_embedding_bag(
    values_VD: torch.Tensor,
    idx_NK: torch.Tensor,
    scores_NK: torch.Tensor,
    grad_sink: GradSink | None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable bag in ``scores_NK`` (output in scores' dtype); the sparse value
    gradient ``(rows_U, grad_UD)`` goes to ``grad_sink`` during backward (None skips it).
    """
    return WeightedEmbeddingBag.apply(values_VD, idx_NK, scores_NK, grad_sink, backend)
