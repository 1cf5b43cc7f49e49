"""Kernel benchmark: GB/s of value rows for the memory lookup, memdist vs torch, same run.

Times the weighted embedding bag forward and backward of ``memdist.kernels`` (the
``auto`` backend: the C++ path on CPU where it builds, Triton on CUDA; on CUDA also
``triton`` and ``torch`` explicitly) against torch's ``F.embedding_bag`` with per-sample weights,
for several table sizes V, row widths D and bag sizes K at N tokens. On CUDA every
figure is also given as a fraction of a device-to-device copy measured in the run.

Bytes counted (reads of row data only; indices, scores and outputs are not counted):

- forward: N*K rows of D elements of the table: ``N*K*D*elem``.
- backward: the scores gradient reads the N*K table rows again (``N*K*D*elem``) and
  the value gradient reads one fp32 row of dy per (n, k) (``N*K*D*4``).

The torch peer's backward is ``autograd.grad`` of ``embedding_bag(..., sparse=True)``
for the weight and the scores, with the sparse weight gradient coalesced, so both
sides produce the same things: dscores and one summed gradient row per touched row.

Prints one JSON object (machine, versions, config, results with memdist/torch
ratios); ``--out DIR`` also writes it to DIR/kernels.json with a bar plot
DIR/kernels.png.

    python benchmarks/bench_kernels.py [--quick] [--out DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import machine, versions, write
from torch.utils import benchmark as tbench

from memdist import kernels


def timeit(fn, min_run_time: float) -> float:
    """Median seconds per call; torch.utils.benchmark synchronises CUDA around runs."""
    fn()  # warm-up: compiles Triton kernels, fills the allocator's caches
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: torch.device, min_run_time: float) -> float:
    """GB/s of a device-to-device copy of 256 MiB, counting read + write."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sec = timeit(lambda: dst.copy_(src), min_run_time)
    return 2 * src.numel() * 4 / sec / 1e9


def bench_case(v, d, n, k, dtype, device, backends, min_run_time) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    values_VD = torch.randn(v, d, generator=g).to(dtype).to(device)
    idx_NK = torch.randint(0, v, (n, k), generator=g).to(device)
    scores_NK = torch.rand(n, k, generator=g).to(dtype).to(device)
    dy_ND = torch.randn(n, d, generator=g, dtype=torch.float32).to(device)
    elem = values_VD.element_size()
    fwd_bytes = n * k * d * elem
    bwd_bytes = n * k * d * elem + n * k * d * 4
    rows = []

    def record(impl, fwd_s, bwd_s):
        rows.append(
            {
                "impl": impl,
                "rows": v,
                "dim": d,
                "tokens": n,
                "bag": k,
                "dtype": str(dtype).split(".")[-1],
                "forward_ms": fwd_s * 1e3,
                "backward_ms": bwd_s * 1e3,
                "forward_GBps": fwd_bytes / fwd_s / 1e9,
                "backward_GBps": bwd_bytes / bwd_s / 1e9,
            }
        )

    weight_VD = values_VD.clone().requires_grad_(True)
    s_NK = scores_NK.clone().requires_grad_(True)

    def torch_fwd():
        return F.embedding_bag(idx_NK, weight_VD, per_sample_weights=s_NK, mode="sum", sparse=True)

    with torch.no_grad():
        torch_fwd_s = timeit(torch_fwd, min_run_time)
    y_ND = torch_fwd()
    dy_peer_ND = dy_ND.to(dtype)  # autograd wants the output's dtype

    def torch_bwd():
        dweight, _ = torch.autograd.grad(y_ND, (weight_VD, s_NK), dy_peer_ND, retain_graph=True)
        return dweight.coalesce()

    record("torch.embedding_bag", torch_fwd_s, timeit(torch_bwd, min_run_time))

    for backend in backends:

        def fwd(backend=backend):
            return kernels.bag_forward(values_VD, idx_NK, scores_NK, backend=backend)

        def bwd(backend=backend):
            kernels.bag_backward_scores(values_VD, idx_NK, dy_ND, backend=backend)
            kernels.bag_backward_values(idx_NK, scores_NK, dy_ND, backend=backend)

        record(f"memdist.{backend}", timeit(fwd, min_run_time), timeit(bwd, min_run_time))
    return rows


def _label(r: dict) -> str:
    return f"V={r['rows']}\nD={r['dim']} K={r['bag']}\n{r['dtype']}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    labels = list(dict.fromkeys(_label(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) + 4), 4.5))
    width = 0.8 / len(impls)
    for ax, key in zip(axes, ("forward_GBps", "backward_GBps"), strict=True):
        for i, impl in enumerate(impls):
            by_label = {_label(r): r[key] for r in rows if r["impl"] == impl}
            xs = [x + i * width for x in range(len(labels))]
            ax.bar(xs, [by_label.get(label, 0.0) for label in labels], width, label=impl)
        ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))], labels)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("GB/s of value rows read")
        ax.set_title(key.split("_")[0])
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    where = result["machine"]["gpu"] or f"{result['machine']['cpu_count']} CPU cores"
    fig.suptitle(f"memory lookup kernels, N={result['config']['tokens']} tokens, on {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, short timing")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON and plot")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    min_run_time = 0.2 if args.quick else 1.0
    tokens = 1024 if args.quick else 4096
    # (table rows V, row width D, bag size K)
    if args.quick:
        sizes = [(65536, 128, 32), (65536, 256, 64)]
    else:
        sizes = [(v, d, k) for v in (65536, 1 << 20) for d in (128, 256) for k in (32, 64)]
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    backends = ["auto"] + (["triton", "torch"] if device.type == "cuda" else [])
    started = time.time()
    results = []
    for v, d, k in sizes:
        for dtype in dtypes:
            results += bench_case(v, d, tokens, k, dtype, device, backends, min_run_time)
    key = lambda r: (r["rows"], r["dim"], r["bag"], r["dtype"])
    peer = {key(r): r for r in results if r["impl"] == "torch.embedding_bag"}
    for r in results:
        r["forward_vs_torch"] = r["forward_GBps"] / peer[key(r)]["forward_GBps"]
        r["backward_vs_torch"] = r["backward_GBps"] / peer[key(r)]["backward_GBps"]
    out = {
        "benchmark": "kernels",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": versions("triton"),
        "config": {
            "device": str(device),
            "tokens": tokens,
            "sizes_VDK": sizes,
            "dtypes": [str(t).split(".")[-1] for t in dtypes],
            "backends": backends,
            "quick": args.quick,
            "min_run_time_s": min_run_time,
            "bytes": {
                "forward": "N*K*D*elem (table rows read)",
                "backward": "N*K*D*elem (table rows, scores grad) + N*K*D*4 (fp32 dy rows, value grad)",
            },
        },
        "results": results,
    }
    if device.type == "cuda":
        copy = copy_bandwidth(device, min_run_time)
        out["device_copy_GBps"] = copy
        for r in results:
            r["forward_vs_copy"] = r["forward_GBps"] / copy
            r["backward_vs_copy"] = r["backward_GBps"] / copy
    out["seconds"] = time.time() - started
    return write(out, args.out, "kernels", plot)


if __name__ == "__main__":
    main()
