"""Kernel benchmark: GB/s of value rows for the memory lookup, memdist vs torch, same run.

Measures the weighted embedding bag forward and backward (scores gradient + sparse
value gradient) of memdist's kernels against torch's ``F.embedding_bag`` (autograd,
``sparse=True`` so torch also produces a sparse row gradient), for several table
sizes and row widths. On CUDA it also runs the Triton backend explicitly and
reports every figure as a fraction of a device-to-device copy measured in the same
run. Prints one JSON object (machine, versions, config, results); ``--out DIR`` also
writes the JSON and a bar plot there.

Bytes counted: forward reads N*K rows of D elements. Backward reads the N*K rows
again (scores gradient) and the output gradient once per (n, k) (value gradient),
so it is counted as 2*N*K*D elements.

    python benchmarks/bench_kernels.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

import memdist
from memdist import kernels


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def versions() -> dict:
    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "memdist": memdist.__version__,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def timeit(fn, min_run_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark synchronises CUDA)."""
    fn()  # warm-up (compiles Triton kernels on first call)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: torch.device, min_run_time: float) -> float:
    """GB/s of a device-to-device copy (read + write) of 256 MiB."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sec = timeit(lambda: dst.copy_(src), min_run_time)
    return 2 * src.numel() * 4 / sec / 1e9


def bench_case(v, d, n, k, dtype, device, backends, min_run_time) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    values = torch.randn(v, d, generator=g).to(dtype).to(device)
    idx = torch.randint(0, v, (n, k), generator=g).to(device)
    scores = torch.rand(n, k, generator=g).to(dtype).to(device)
    dy = torch.randn(n, d, generator=g, dtype=torch.float32).to(device)
    elem = values.element_size()
    fwd_bytes = n * k * d * elem
    bwd_bytes = 2 * n * k * d * elem
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

    # torch peer: embedding_bag with per-sample weights, sparse row gradient.
    weight = values.clone().requires_grad_(True)
    s_req = scores.clone().requires_grad_(True)

    def torch_fwd():
        return F.embedding_bag(idx, weight, per_sample_weights=s_req, mode="sum", sparse=True)

    y_ref = torch_fwd()

    def torch_bwd():
        weight.grad = None
        s_req.grad = None
        torch.autograd.grad(y_ref, (weight, s_req), dy, retain_graph=True)

    record("torch.embedding_bag", timeit(torch_fwd, min_run_time), timeit(torch_bwd, min_run_time))

    for backend in backends:

        def fwd(backend=backend):
            return kernels.bag_forward(values, idx, scores, backend=backend)

        def bwd(backend=backend):
            kernels.bag_backward_scores(values, idx, dy, backend=backend)
            kernels.bag_backward_values(idx, scores, dy, backend=backend)

        record(f"memdist.{backend}", timeit(fwd, min_run_time), timeit(bwd, min_run_time))
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    labels = sorted({f"V={r['rows']}\nD={r['dim']}" for r in rows}, key=lambda s: (len(s), s))
    impls = sorted({r["impl"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    width = 0.8 / len(impls)
    for ax, key in zip(axes, ("forward_GBps", "backward_GBps"), strict=True):
        for i, impl in enumerate(impls):
            ys = []
            for label in labels:
                match = [
                    r[key]
                    for r in rows
                    if r["impl"] == impl and f"V={r['rows']}\nD={r['dim']}" == label
                ]
                ys.append(match[0] if match else 0)
            ax.bar([x + i * width for x in range(len(labels))], ys, width, label=impl)
        ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))], labels)
        ax.set_ylabel("GB/s of value rows")
        ax.set_title(key.split("_")[0])
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"memory lookup kernels on {result['machine']['gpu'] or result['machine']['processor']}"
    )
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
    tokens, bag = (1024, 64) if args.quick else (4096, 64)
    sizes = (
        [(65536, 128), (65536, 256)]
        if args.quick
        else [(65536, 128), (65536, 256), (1 << 20, 128), (1 << 20, 256)]
    )
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    backends = ["auto"] + (["triton", "torch"] if device.type == "cuda" else [])
    started = time.time()
    results = []
    for v, d in sizes:
        for dtype in dtypes:
            results += bench_case(v, d, tokens, bag, dtype, device, backends, min_run_time)
    peer = {
        (r["rows"], r["dim"], r["dtype"]): r for r in results if r["impl"] == "torch.embedding_bag"
    }
    for r in results:
        base = peer[(r["rows"], r["dim"], r["dtype"])]
        r["forward_vs_torch"] = r["forward_GBps"] / base["forward_GBps"]
        r["backward_vs_torch"] = r["backward_GBps"] / base["backward_GBps"]
    out = {
        "benchmark": "kernels",
        "machine": machine(),
        "versions": versions(),
        "config": {
            "device": str(device),
            "tokens": tokens,
            "bag": bag,
            "sizes": sizes,
            "dtypes": [str(t).split(".")[-1] for t in dtypes],
            "quick": args.quick,
        },
        "results": results,
        "seconds": time.time() - started,
    }
    if device.type == "cuda":
        copy = copy_bandwidth(device, min_run_time)
        out["device_copy_GBps"] = copy
        for r in results:
            r["forward_vs_copy"] = r["forward_GBps"] / copy
            r["backward_vs_copy"] = r["backward_GBps"] / copy
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps(out, indent=2))
        plot(out, args.out / "kernels.png")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
