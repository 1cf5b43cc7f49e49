"""The Triton kernels compiled on a GPU: a correctness sweep, 64-bit row offsets, and
bandwidth as a fraction of a device-to-device copy measured in the same run.

The GPU checklist's order (shared with the project's notes), in one process:

1. ``sweep``: forward, scores backward and values backward against ``F.embedding_bag``
   computed in float64 on the same (rounded) inputs, for row widths 96, 520, 1024 and
   4097 (one and several column blocks, odd widths) and fp32/bf16/fp16 tables, with
   uniform and Zipf-like indices; the three sparse optimizers at widths 1024 and 1500
   against ``reference.sparse_update_`` on fp32 copies. Errors are ||out - ref|| /
   ||ref||. Outputs are allocated from memory filled with NaN first, so an element a
   kernel fails to write shows up as NaN.
2. ``rows64``: a bf16 table of (2**21 + 64) x 1024 rows (more than 2**31 elements) read
   and updated (SGD, Adam) at rows >= 2**21, against the torch path on those rows.
3. ``bandwidth``: forward, scores backward and values backward at N tokens, K rows per
   token, width D, on a table of V rows (by default 16M rows of 1024 bf16: 32 GiB, far
   past the L2), uniform and Zipf-like indices, against a same-run copy and torch's
   ``F.embedding_bag``; launch variants of the forward and values-backward kernels;
   the sparse update's bytes per second.

Bytes counted as in ``bench_kernels``: forward N*K*D*elem (rows read); scores
backward N*K*D*elem (rows read again); values backward N*K*D*4 (an fp32 dy row per
position; at N = 16384 and D = 1024 dy is 64 MiB and mostly read from L2). The fewest
bytes the whole backward must move, ``backward_moved``: N*K*D*elem rows read, U*D*4
gradient rows written (U unique rows), N*D*4 of dy read; update U*D*(2*elem + 4 + state): the row read and written, its gradient,
and Adam's two fp32 moments read and written (8 bytes each per element).

    python benchmarks/bench_gpu_kernels.py [--rows 16777216] [--quick] [--out DIR]
    python benchmarks/bench_gpu_kernels.py --sanitize   # a small case for compute-sanitizer

Prints one JSON object; ``--out DIR`` also writes DIR/gpu_kernels.json and a plot.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from report import machine, versions, write

from memdist import kernels
from memdist.kernels import OptimizerSpec, reference

DEV = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))  # cpu: a smoke run under the interpreter
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- inputs --------------------------------------------------------------------------


def indices(n: int, k: int, v: int, dist: str, g: torch.Generator) -> torch.Tensor:
    """(n, k) int64 rows: ``uniform``, or ``zipf`` (log-uniform ranks, about Zipf with
    exponent 1, scattered over the table by a fixed odd multiplier so hot rows are not
    adjacent)."""
    if dist == "uniform":
        return torch.randint(0, v, (n, k), generator=g, device=DEV)
    u = torch.rand(n, k, generator=g, device=DEV, dtype=torch.float64)
    rank = torch.exp(u * math.log(v)).long().clamp_(1, v) - 1
    return (rank * 2654435761) % v


def poison_allocator(nbytes: int) -> None:
    """Leave NaN in the caching allocator's free blocks, so outputs the kernels take from
    ``torch.empty`` start as NaN and an unwritten element is seen."""
    block = torch.full((nbytes // 4,), float("nan"), device=DEV)
    del block


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def densify(rows_U: torch.Tensor, grad_UD: torch.Tensor, v: int) -> torch.Tensor:
    dense = torch.zeros(v, grad_UD.shape[1], dtype=torch.float64, device=DEV)
    dense[rows_U] = grad_UD.double()
    return dense


# --- 1. sweep ------------------------------------------------------------------------


def sweep_bag(d: int, dtype: str, dist: str, n=512, k=32, v=4096, seed=0) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    values = torch.randn(v, d, generator=g, device=DEV).to(DTYPES[dtype])
    idx = indices(n, k, v, dist, g)
    scores = torch.rand(n, k, generator=g, device=DEV).to(DTYPES[dtype])
    dy = torch.randn(n, d, generator=g, device=DEV)
    w64 = values.double().requires_grad_(True)
    s64 = scores.double().requires_grad_(True)
    y64 = F.embedding_bag(idx, w64, per_sample_weights=s64, mode="sum")
    y64.backward(dy.double())
    poison_allocator(64 * 2**20)
    y = kernels.bag_forward(values, idx, scores, backend="triton")
    poison_allocator(64 * 2**20)
    ds = kernels.bag_backward_scores(values, idx, dy, backend="triton")
    poison_allocator(64 * 2**20)
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend="triton")
    torch.cuda.synchronize()
    return {
        "dim": d, "dtype": dtype, "dist": dist,
        "forward": rel_err(y, y64), "scores": rel_err(ds, s64.grad),
        "values": rel_err(densify(rows, grad, v), w64.grad),
        "rows_ok": bool(torch.equal(rows, torch.unique(idx))),
    }  # fmt: skip


def sweep_update(optimizer: str, d: int, dtype: str, v=2048, u=300, steps=3, seed=1) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    values = torch.randn(v, d, generator=g, device=DEV).to(DTYPES[dtype])
    expect = values.float().cpu()
    state = kernels.init_optimizer_state(optimizer, v, d, DEV)
    state_ref = kernels.init_optimizer_state(optimizer, v, d, "cpu")
    untouched_before = values.clone()
    touched = torch.zeros(v, dtype=torch.bool, device=DEV)
    for step in range(steps):
        rows = torch.randperm(v, generator=g, device=DEV)[:u]
        touched[rows] = True
        grad = torch.randn(u, d, generator=g, device=DEV)
        spec = OptimizerSpec(optimizer, lr=0.05, eps=1e-8, betas=(0.9, 0.99),
                             weight_decay=0.1 * step)  # fmt: skip
        kernels.sparse_update_(spec, values, state, rows, grad, backend="triton")
        reference.sparse_update_(spec, expect, state_ref, rows.cpu(), grad.cpu())
        if dtype != "fp32":  # the table rounds after every step; so does the reference
            expect = expect.to(DTYPES[dtype]).float()
    torch.cuda.synchronize()
    out = {"optimizer": optimizer, "dim": d, "dtype": dtype,
           "values": rel_err(values.float().cpu(), expect),
           "untouched_equal": bool(torch.equal(values[~touched], untouched_before[~touched]))}  # fmt: skip
    for key in state:
        out[key] = rel_err(state[key].cpu().double(), state_ref[key].double())
    return out


def sweep(quick: bool) -> dict:
    dims = (96, 520, 1024, 4097)
    bags = [sweep_bag(d, dt, dist) for d in dims for dt in DTYPES
            for dist in (("uniform",) if quick else ("uniform", "zipf"))]  # fmt: skip
    updates = [sweep_update(o, d, dt) for o in kernels.OPTIMIZERS for d in (1024, 1500)
               for dt in ("fp32", "bf16")]  # fmt: skip
    worst = max(max(r["forward"], r["scores"], r["values"]) for r in bags)
    worst_fp32_update = max(r["values"] for r in updates if r["dtype"] == "fp32")
    ok = (
        all(r["rows_ok"] for r in bags)
        and all(r["untouched_equal"] for r in updates)
        and worst < 1e-5  # NaN (an unwritten element) fails this too
        and worst_fp32_update < 1e-5
    )
    return {"bags": bags, "updates": updates, "worst_bag_rel_err": worst,
            "worst_fp32_update_rel_err": worst_fp32_update, "ok": ok}  # fmt: skip


# --- 2. rows past 2**31 elements ---------------------------------------------------


def rows64(d=1024, seed=2) -> dict:
    v = 2**21 + 64
    g = torch.Generator(device=DEV).manual_seed(seed)
    values = torch.randn(v, d, generator=g, device=DEV, dtype=torch.bfloat16)
    n, k = 256, 16
    idx = torch.randint(2**21, v, (n, k), generator=g, device=DEV)
    idx[:, 0] = torch.randint(0, 2**21, (n,), generator=g, device=DEV)  # and low rows
    scores = torch.rand(n, k, generator=g, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(n, d, generator=g, device=DEV)
    out = {"rows": v, "dim": d, "elements": v * d}
    for name, fn in (
        ("forward", lambda b: kernels.bag_forward(values, idx, scores, backend=b)),
        ("scores", lambda b: kernels.bag_backward_scores(values, idx, dy, backend=b)),
    ):
        out[name] = rel_err(fn("triton"), fn("torch"))
    for optimizer in ("sgd", "adam"):
        rows = torch.arange(v - 64, v, device=DEV)  # the last rows: offsets past 2**31
        grad = torch.randn(64, d, generator=g, device=DEV)
        spec = OptimizerSpec(optimizer, lr=0.05, eps=1e-8, betas=(0.9, 0.99))
        small = values[rows].clone()
        state = kernels.init_optimizer_state(optimizer, v, d, DEV)
        small_state = kernels.init_optimizer_state(optimizer, 64, d, DEV)
        kernels.sparse_update_(spec, values, state, rows, grad, backend="triton")
        local = torch.arange(64, device=DEV)
        kernels.sparse_update_(spec, small, small_state, local, grad, backend="torch")
        out[optimizer] = rel_err(values[rows].float(), small.float())
        del state
    # The updates round to bf16 and Adam divides approximately on a GPU, so a few elements
    # land one bf16 step apart; a wrong row offset would be off by about 1.
    out["ok"] = (
        out["forward"] < 1e-5 and out["scores"] < 1e-5 and max(out["sgd"], out["adam"]) < 1e-2
    )
    return out


# --- 3. bandwidth ------------------------------------------------------------------


def bench_ms(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def variant_ms(fn) -> float | str:
    """``bench_ms``, or the error when this launch variant does not compile: Triton 3.6
    failed an internal pass (RemoveLayoutConversions) on a values backward that summed
    32 x 128 tiles of segments side by side (2026-11-26, since replaced)."""
    try:
        return bench_ms(fn)
    except Exception as exc:  # a variant that fails is recorded, the others still run
        return f"{type(exc).__name__}: {exc}"


def copy_gbps(nbytes=2 * 2**30) -> float:
    src = torch.empty(nbytes // 4, device=DEV).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / bench_ms(lambda: dst.copy_(src)) / 1e6


def forward_variants(values, idx, scores) -> list[dict]:
    """The forward kernel under other tiles, warps and pipeline depths (ms each)."""
    from memdist.kernels import triton_bag

    out = []
    for block_k, block_d, warps, stages in [
        (8, 256, 4, 3), (4, 512, 4, 3), (2, 1024, 4, 3), (1, 1024, 4, 3), (2, 1024, 8, 3),
    ]:  # fmt: skip
        blocks = dict(BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
        ms = variant_ms(lambda b=blocks: triton_bag.bag_forward(values, idx, scores, blocks=b))
        out.append({**blocks, "ms": ms})
    return out


def scores_variants(values, idx, dy) -> list[dict]:
    """The scores-backward kernel under other tiles (ms each)."""
    from memdist.kernels import triton_bag

    out = []
    for block_k, block_d, warps in [(32, 64, 4), (16, 128, 4), (16, 128, 8), (8, 128, 4),
                                    (16, 64, 4), (32, 128, 8), (8, 256, 4)]:  # fmt: skip
        blocks = dict(BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps)
        ms = variant_ms(lambda b=blocks: triton_bag.bag_backward_scores(values, idx, dy, blocks=b))
        out.append({**blocks, "ms": ms})
    return out


def values_variants(idx, scores, dy) -> list[dict]:
    """The values backward (reverse index and segments included) under other tiles and
    segment lengths (ms each), and the reverse index alone."""
    from memdist.kernels import triton_bag
    from memdist.kernels.torch_ops import reverse_index

    out = []
    for block_j, block_d, warps, segment in [
        (2, 1024, 4, 128), (2, 1024, 4, 32), (2, 1024, 4, 512), (1, 1024, 4, 128),
        (4, 1024, 8, 128), (4, 512, 4, 128), (8, 256, 4, 128),
    ]:  # fmt: skip
        blocks = dict(BLOCK_J=block_j, BLOCK_D=block_d, num_warps=warps)
        ms = variant_ms(
            lambda b=blocks, sg=segment: triton_bag.bag_backward_values(
                idx, scores, dy, blocks=b, segment=sg
            )
        )
        out.append({**blocks, "segment": segment, "ms": ms})
    out.append({"reverse_index_ms": bench_ms(lambda: reverse_index(idx))})
    return out


def timings(values, idx, scores, dy) -> dict[str, float]:
    """Milliseconds of the three Triton kernels (as called in training) and torch's forward."""
    t = {
        "forward": bench_ms(lambda: kernels.bag_forward(values, idx, scores, backend="triton")),
        "scores": bench_ms(lambda: kernels.bag_backward_scores(values, idx, dy, backend="triton")),
        "values": bench_ms(lambda: kernels.bag_backward_values(idx, scores, dy, backend="triton")),
    }
    with torch.no_grad():
        t["torch_forward"] = bench_ms(
            lambda: F.embedding_bag(idx, values, per_sample_weights=scores, mode="sum")
        )
    return t


def bandwidth(v: int, d: int, n: int, k: int, dtype: str, copy: float) -> dict:
    g = torch.Generator(device=DEV).manual_seed(3)
    values = torch.empty(v, d, device=DEV, dtype=DTYPES[dtype]).normal_(generator=g)
    elem = values.element_size()
    rows_bytes = n * k * d * elem
    out = {"rows": v, "dim": d, "tokens": n, "bag": k, "dtype": dtype,
           "table_GiB": v * d * elem / 2**30, "cases": []}  # fmt: skip
    for dist in ("uniform", "zipf"):
        idx = indices(n, k, v, dist, g)
        scores = torch.rand(n, k, generator=g, device=DEV).to(values.dtype)
        dy = torch.randn(n, d, generator=g, device=DEV)
        t = timings(values, idx, scores, dy)
        u = int(torch.unique(idx).numel())
        case = {"dist": dist, "unique_rows": u, **{f"{key}_ms": ms for key, ms in t.items()}}
        # The fewest bytes the backward must move: the rows read once for the scores, one
        # fp32 gradient row written per unique row, dy read once.
        moved = rows_bytes + u * d * 4 + n * d * 4
        gbps = {"forward": rows_bytes / t["forward"] / 1e6,
                "scores": rows_bytes / t["scores"] / 1e6,
                "values": n * k * d * 4 / t["values"] / 1e6,
                "backward": (rows_bytes + n * k * d * 4) / (t["scores"] + t["values"]) / 1e6,
                "backward_moved": moved / (t["scores"] + t["values"]) / 1e6,
                "torch_forward": rows_bytes / t["torch_forward"] / 1e6}  # fmt: skip
        for key, x in gbps.items():
            case[f"{key}_GBps"] = x
            case[f"{key}_vs_copy"] = x / copy
        case["forward_vs_torch"] = t["torch_forward"] / t["forward"]
        case["forward_variants"] = forward_variants(values, idx, scores)
        case["scores_variants"] = scores_variants(values, idx, dy)
        case["values_variants"] = values_variants(idx, scores, dy)
        out["cases"].append(case)
    return out


def update_bandwidth(v: int, d: int, u: int, copy: float) -> list[dict]:
    """Bytes per second of the fused update of u unique rows, per optimizer (bf16 table)."""
    g = torch.Generator(device=DEV).manual_seed(4)
    values = torch.empty(v, d, device=DEV, dtype=torch.bfloat16).normal_(generator=g)
    rows = torch.randperm(v, generator=g, device=DEV)[:u]
    grad = torch.randn(u, d, generator=g, device=DEV)
    out = []
    for optimizer, state_bytes in (("sgd", 0), ("adagrad", 0), ("adam", 16)):
        state = kernels.init_optimizer_state(optimizer, v, d, DEV)
        spec = OptimizerSpec(optimizer, lr=1e-6)
        ms = bench_ms(
            lambda s=spec, st=state: kernels.sparse_update_(
                s, values, st, rows, grad, backend="triton"
            )
        )
        nbytes = u * d * (2 * values.element_size() + 4 + state_bytes)
        out.append({"optimizer": optimizer, "rows": v, "dim": d, "touched": u, "ms": ms,
                    "GBps": nbytes / ms / 1e6, "vs_copy": nbytes / ms / 1e6 / copy})  # fmt: skip
    return out


# --- report ---------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["bandwidth"]["cases"]
    keys = ["forward", "torch_forward", "scores", "values", "backward", "backward_moved"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        xs = [x + i * width for x in range(len(keys))]
        ax.bar(xs, [case[f"{key}_vs_copy"] for key in keys], width, label=case["dist"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + width * (len(cases) - 1) / 2 for x in range(len(keys))], keys)
    ax.set_ylabel(f"fraction of a copy ({result['copy_GBps']:.0f} GB/s)")
    b = result["bandwidth"]
    ax.set_title(f"{result['machine']['gpu']}: V={b['rows']} D={b['dim']} {b['dtype']}, "
                 f"N={b['tokens']} K={b['bag']}")  # fmt: skip
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sanitize_case() -> None:
    """A small case for compute-sanitizer: D = 4097 (an odd width, 5 column blocks), K = 20,
    and row 0 read 192 times, so its positions are split and the partial-sum kernel runs."""
    g = torch.Generator(device=DEV).manual_seed(5)
    v, d, n, k = 300, 4097, 24, 20
    values = torch.randn(v, d, generator=g, device=DEV, dtype=torch.bfloat16)
    idx = torch.randint(0, v, (n, k), generator=g, device=DEV)
    idx[:, :8] = 0  # 24 x 8 = 192 positions: more than one segment (triton_bag.SEGMENT)
    scores = torch.rand(n, k, generator=g, device=DEV)
    dy = torch.randn(n, d, generator=g, device=DEV)
    kernels.bag_forward(values, idx, scores, backend="triton")
    kernels.bag_backward_scores(values, idx, dy, backend="triton")
    rows, grad = kernels.bag_backward_values(idx, scores, dy, backend="triton")
    for optimizer in kernels.OPTIMIZERS:
        state = kernels.init_optimizer_state(optimizer, v, d, DEV)
        kernels.sparse_update_(
            OptimizerSpec(optimizer), values, state, rows, grad, backend="triton"
        )
    torch.cuda.synchronize()
    print("sanitize case done")


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2**24, help="table rows for the bandwidth runs")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--bag", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="fewer sweep cases, a 1M-row table")
    p.add_argument("--sanitize", action="store_true", help="only the small compute-sanitizer case")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_kernels needs a CUDA device")
    if args.sanitize:
        sanitize_case()
        return None
    started = time.time()
    rows = 2**20 if args.quick else args.rows
    result = {"benchmark": "gpu_kernels", "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "versions": versions("triton"),
              "config": {**vars(args), "out": str(args.out), "rows": rows,
                         "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION")}}  # fmt: skip
    result["copy_GBps"] = copy = copy_gbps()
    print(f"copy {copy:.1f} GB/s", flush=True)
    # Each part runs even when one before it failed: a GPU lease is short.
    parts = {
        "sweep": lambda: sweep(args.quick),
        "rows64": rows64,
        "bandwidth": lambda: bandwidth(rows, args.dim, args.tokens, args.bag, "bf16", copy),
        "update": lambda: update_bandwidth(min(rows, 2**21), args.dim, 65536, copy),
    }
    for name, part in parts.items():
        t0 = time.time()
        try:
            result[name] = part()
        except Exception:  # recorded in the report; the remaining parts still run
            result[name] = {"error": traceback.format_exc()}
        torch.cuda.empty_cache()
        print(f"{name} ({time.time() - t0:.1f} s): {summary(name, result[name])}", flush=True)
    result["copy_GBps_after"] = copy_gbps()
    result["seconds"] = time.time() - started
    write(result, args.out, "gpu_kernels", plot if "cases" in result["bandwidth"] else _no_plot)
    print(f"copy GB/s before {copy:.1f} after {result['copy_GBps_after']:.1f}")
    for name in parts:
        print(f"{name}: {summary(name, result[name])}")
    return result


def _no_plot(result: dict, path: Path) -> None:
    pass


def summary(name: str, part) -> str:
    """One readable line (or a few) per part, for the end of the log."""
    if isinstance(part, dict) and "error" in part:
        return "FAILED\n" + part["error"]
    if name == "sweep":
        return (f"ok={part['ok']} worst bag rel err {part['worst_bag_rel_err']:.3g}, "
                f"worst fp32 update rel err {part['worst_fp32_update_rel_err']:.3g}")  # fmt: skip
    if name == "rows64":
        return str(part)
    if name == "update":
        return str([(r["optimizer"], round(r["GBps"], 1), round(r["vs_copy"], 3)) for r in part])
    lines = []
    keys = ("forward", "torch_forward", "scores", "values", "backward", "backward_moved")
    for case in part["cases"]:
        ratios = {key: round(case[f"{key}_vs_copy"], 3) for key in keys}
        ms = {key: round(case[f"{key}_ms"], 3)
              for key in ("forward", "scores", "values", "torch_forward")}  # fmt: skip
        lines.append(f"{case['dist']} (U={case['unique_rows']}) vs copy {ratios} ms {ms}")
        for kind in ("forward", "scores", "values"):
            compact = [tuple(round(x, 3) if isinstance(x, float) else x for x in r.values())
                       for r in case[f"{kind}_variants"]]  # fmt: skip
            lines.append(f"  {kind} variants {compact}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
