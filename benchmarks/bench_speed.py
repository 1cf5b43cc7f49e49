"""Speed benchmark (issue 13): the memory model against the dense one, and the CPU
kernels against a memory copy, every figure a ratio to a peer measured in the same run.

Parts (one JSON object: machine, versions, config, load averages, results, goals):

1. ``steps``: training-step tokens/s of ``dense``, ``small`` with a local table
   (``--shards 0``) and ``small`` with its 2 Ray shard actors, in interleaved rounds
   (each round runs every model for ``--steps`` steps). A
   plain loop: forward, backward, AdamW on the backbone, the tables' sparse step (no
   DeepSpeed engine, whose per-step cost is the same for both models). Where the
   ``cpp`` backend exists, ``small`` also runs with ``model.memory.backend=torch``
   (the kernels of main at 36bc532) as a peer.
2. ``kernels``: the value lookup at the small model's shape (N tokens x K rows of D
   fp32) for tables of ``--rows`` rows: forward, and backward + lazy Adam update,
   as GB/s against a 256 MiB copy timed in the same rounds, and backward + update of
   the default backend against the ``torch`` backend (main's implementation).
   Bytes are rows read and written: forward N*K table rows read + N output rows
   written; backward + update N*K table rows (scores' gradient) + N*K dy rows read
   and U gradient rows written (values' gradient), then U rows of weight, gradient
   and both moments read and weight and moments written (Adam): (2NK + 8U) * D * 4.
   ``--profile`` adds the top ops of 3 profiled steps of ``dense`` and ``small``.
3. ``big`` (``--big``): the small model's step with a 16M-row table against the
   64K-row one at equal forward FLOPs (k_dim 66 and 6, SGD values: 8 GiB of values).

    python benchmarks/bench_speed.py [--quick] [--rounds N] [--big] [--out DIR --name NAME]

Other tenants load the machine in bursts that outlast a round, so every figure is
given from the fastest run of each thing (the least disturbed; what the ratios and
goals use) and from the median.

Run under an older memdist (``PYTHONPATH`` at an install of main) it measures the
"before" report with the same code: only APIs main has are used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import spin  # first: --spin must be in the environment before torch loads

# isort: split
import torch
from report import machine, versions, write

from memdist import kernels
from memdist.assembly import build_model, make_optimizer, unique_tables
from memdist.config import load_config
from memdist.model import flops_per_token
from memdist.step import loss_fn
from memdist.values import init_values

GOALS = {  # name: (goal, True when the figure must be at least the goal, else at most)
    "small_local_vs_dense": (0.9, True),
    "small_2ray_vs_dense": (0.8, True),
    "forward_vs_copy": (0.5, True),
    "backward_update_vs_copy": (0.3, True),
    "backward_update_vs_main": (3.0, True),
    "rows16M_vs_64K_step": (1.5, False),
}
EQUAL_FLOPS_K_DIM = {256: 66, 4096: 6}  # as bench_sharded.py: heads*k_dim*(dim+n_keys) fixed


def has_cpp() -> bool:
    return "cpp" in kernels.BACKENDS


# --- part 1: model steps ----------------------------------------------------------


class Runner:
    """One model, its optimizer and tables, stepping on a fixed batch."""

    def __init__(self, name: str, overrides: list[str]) -> None:
        self.cfg = load_config(name, overrides)
        self.group = None
        tables = None
        if self.cfg.model.memory is not None and self.cfg.shards.count > 0:
            from memdist.shards import start_remote_tables

            tables, self.group = start_remote_tables(self.cfg)
        self.model, tables = build_model(self.cfg, torch.device("cpu"), tables)
        self.tables = unique_tables(tables)
        self.opt, _ = make_optimizer(self.cfg, self.model)
        b, t = self.cfg.data.batch_size, self.cfg.data.seq_len
        self.tokens = b * t
        self.x = torch.randint(0, 256, (b, t + 1), generator=torch.Generator().manual_seed(0))
        self.times: list[float] = []
        for _ in range(2):  # warm-up: allocator, first builds, shard connections
            self.step()

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = loss_fn(self.model(self.x[:, :-1]), self.x[:, 1:])
        for table in self.tables:  # as memdist.step.train_step; a "before" install may lack it
            getattr(table, "expect_step", lambda: None)()
        loss.backward()
        stepping = [table.step_async() for table in self.tables]
        self.opt.step()
        self.opt.zero_grad()
        for pending in stepping:
            pending.wait()
        return time.perf_counter() - t0

    def run(self, steps: int) -> None:
        self.times += [self.step() for _ in range(steps)]

    def close(self) -> None:
        if self.group is not None:
            self.group.stop()


def profile_steps(runner: Runner, steps: int = 3, top: int = 15) -> list[dict]:
    """The ``top`` ops by self CPU time over ``steps`` steps (torch.profiler), per step."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            runner.step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "total_ms_per_step": e.cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in rows[:top]]  # fmt: skip


def bench_steps(rounds: int, steps: int, profiled: bool = False) -> dict:
    models = {
        "dense": ("dense", []),
        "small_local": ("small", ["shards.count=0"]),
        "small_2ray": ("small", ["shards.count=2", "shards.transport=ray"]),
        # The same shards with every message through Ray's object store (as before
        # shards.shared_memory), in the same run.
        "small_2ray_object_store": (
            "small",
            ["shards.count=2", "shards.transport=ray", "shards.shared_memory=false"],
        ),
    }
    if has_cpp():  # main's kernels as a peer, in the same run
        models["small_local_torch"] = ("small", ["shards.count=0", "model.memory.backend=torch"])
        models["small_2ray_torch"] = ("small", ["shards.count=2", "shards.transport=ray",
                                                "model.memory.backend=torch"])  # fmt: skip
    runners = {key: Runner(name, over) for key, (name, over) in models.items()}
    profiles = {}
    try:
        for _ in range(rounds):
            for r in runners.values():
                r.run(steps)
        if profiled:
            profiles = {key: profile_steps(runners[key]) for key in ("dense", "small_local")}
    finally:
        for r in runners.values():
            r.close()
    out = {}
    for key, r in runners.items():
        fast, med = min(r.times), statistics.median(r.times)
        out[key] = {"step_ms": fast * 1e3, "step_ms_median": med * 1e3,
                    "tokens_per_s": r.tokens / fast, "tokens_per_s_median": r.tokens / med,
                    "flops_per_token": flops_per_token(r.cfg.model, r.cfg.data.seq_len)["forward"],
                    "steps": len(r.times)}  # fmt: skip
    for v in out.values():
        v["vs_dense"] = v["tokens_per_s"] / out["dense"]["tokens_per_s"]
        v["vs_dense_median"] = v["tokens_per_s_median"] / out["dense"]["tokens_per_s_median"]
    if profiles:
        out["profiles"] = profiles
    return out


# --- part 2: kernels ----------------------------------------------------------------


def bench_kernels(rows: int, n: int, k: int, d: int, rounds: int, calls: int) -> dict:
    g = torch.Generator().manual_seed(0)
    # Tables as memdist allocates them (init_values; after main, with huge-page advice).
    values = {b: init_values(0, rows, d, seed=i) for i, b in enumerate(("auto", "torch"))}
    state = {b: kernels.init_optimizer_state("adam", rows, d) for b in values}
    spec = kernels.OptimizerSpec("adam", lr=1e-3)
    idx_NK = torch.randint(0, rows, (n, k), generator=g)
    scores_NK = torch.softmax(torch.randn(n, k, generator=g), -1)
    dy_ND = torch.randn(n, d, generator=g)
    src = torch.empty(64 * 2**20)
    dst = torch.empty_like(src)
    u = int(torch.unique(idx_NK).numel())

    def forward():
        kernels.bag_forward(values["auto"], idx_NK, scores_NK)

    def backward_update(backend):
        def fn():
            _, rows_U, grad_UD = kernels.bag_backward(
                values[backend], idx_NK, scores_NK, dy_ND, backend=backend
            )
            kernels.sparse_update_(spec, values[backend], state[backend], rows_U, grad_UD,
                                   backend=backend)  # fmt: skip

        return fn

    fns = {"copy": lambda: dst.copy_(src), "forward": forward,
           "backward_update": backward_update("auto"),
           "backward_update_main": backward_update("torch")}  # fmt: skip
    times: dict[str, list[float]] = {key: [] for key in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    sec = {key: min(ts) for key, ts in times.items()}
    med = {key: statistics.median(ts) for key, ts in times.items()}
    nbytes = {"copy": 2 * src.numel() * 4, "forward": (n * k + n) * d * 4,
              "backward_update": (2 * n * k + 8 * u) * d * 4,
              "backward_update_main": (2 * n * k + 8 * u) * d * 4}  # fmt: skip
    out = {key: {"ms": sec[key] * 1e3, "GBps": nbytes[key] / sec[key] / 1e9,
                 "ms_median": med[key] * 1e3, "GBps_median": nbytes[key] / med[key] / 1e9}
           for key in fns}  # fmt: skip
    for v in out.values():
        v["vs_copy"] = v["GBps"] / out["copy"]["GBps"]
        v["vs_copy_median"] = v["GBps_median"] / out["copy"]["GBps_median"]
    out["config"] = {"rows": rows, "tokens": n, "bag": k, "dim": d, "unique_rows": u,
                     "optimizer": "adam", "default_backend": kernels._resolve("auto", dy_ND.device)}  # fmt: skip
    out["backward_update_vs_main"] = sec["backward_update_main"] / sec["backward_update"]
    out["backward_update_vs_main_median"] = med["backward_update_main"] / med["backward_update"]
    return out


# --- part 3: a 16M-row table against a 64K-row one at equal FLOPs ---------------------


def bench_big(rounds: int, steps: int) -> dict:
    runners = {}
    for n_keys, k_dim in EQUAL_FLOPS_K_DIM.items():
        runners[n_keys] = Runner("small", [
            f"model.memory.n_keys={n_keys}", f"model.memory.k_dim={k_dim}", "shards.count=0",
            "model.memory.value_optimizer=sgd"])  # fmt: skip
    for _ in range(rounds):
        for r in runners.values():
            r.run(steps)
    out = {}
    for n_keys, r in runners.items():
        out[str(n_keys**2)] = {
            "k_dim": EQUAL_FLOPS_K_DIM[n_keys], "step_ms": min(r.times) * 1e3,
            "step_ms_median": statistics.median(r.times) * 1e3,
            "flops_per_token": flops_per_token(r.cfg.model, r.cfg.data.seq_len)["forward"],
        }  # fmt: skip
    out["ratio"] = out[str(4096**2)]["step_ms"] / out[str(256**2)]["step_ms"]
    out["ratio_median"] = out[str(4096**2)]["step_ms_median"] / out[str(256**2)]["step_ms_median"]
    return out


# --- report -------------------------------------------------------------------------


def goals(result: dict) -> dict:
    figures = {}
    if "steps" in result:
        figures["small_local_vs_dense"] = result["steps"]["small_local"]["vs_dense"]
        figures["small_2ray_vs_dense"] = result["steps"]["small_2ray"]["vs_dense"]
    if "kernels" in result:
        ker = result["kernels"][-1]  # the largest table
        figures["forward_vs_copy"] = ker["forward"]["vs_copy"]
        figures["backward_update_vs_copy"] = ker["backward_update"]["vs_copy"]
        figures["backward_update_vs_main"] = ker["backward_update_vs_main"]
    if "big" in result:
        figures["rows16M_vs_64K_step"] = result["big"]["ratio"]
    out = {}
    for name, value in figures.items():
        goal, at_least = GOALS[name]
        out[name] = {
            "value": value,
            "goal": goal,
            "met": value >= goal if at_least else value <= goal,
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result["goals"]
    names = list(g)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(names, [g[n]["value"] for n in names],
           color=["tab:green" if g[n]["met"] else "tab:red" for n in names])  # fmt: skip
    ax.scatter(names, [g[n]["goal"] for n in names], marker="_", s=900, color="black",
               label="goal", zorder=3)  # fmt: skip
    for i, n in enumerate(names):
        ax.annotate(f"{g[n]['value']:.2f}", (i, g[n]["value"]), ha="center", va="bottom")
    ax.set_ylabel("ratio (same run)")
    ax.set_title(f"issue 13 goals, {result['label']}")
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few rounds and steps")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (more: steadier)")
    p.add_argument("--big", action="store_true", help="also the 16M-row table (8 GiB)")
    p.add_argument("--rows", type=int, nargs="+", default=[65536, 1048576])
    p.add_argument("--label", default="after", help="a word for the plot's title")
    p.add_argument("--profile", action="store_true", help="also profile 3 steps of dense and small")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--name", default="speed")
    p.add_argument("--spin", type=int, default=None, help=spin.HELP)
    args = p.parse_args(argv)
    rounds, steps, calls = (1, 3, 3) if args.quick else (args.rounds, 3, 5)
    load_start = os.getloadavg()
    started = time.time()
    result: dict = {"benchmark": "speed", "label": args.label, "machine": machine(),
                    "versions": versions("ray"), "memdist_kernels": str(Path(kernels.__file__).parent),
                    "config": {"rounds": rounds, "steps_per_round": steps, "kernel_calls": calls,
                               "kernel_rows": args.rows, "big": args.big},
                    "loadavg_start": load_start}  # fmt: skip
    result["kernels"] = [bench_kernels(r, 2048, 64, 128, rounds, calls) for r in args.rows]
    result["steps"] = bench_steps(rounds, steps, args.profile)
    if args.big:
        result["big"] = bench_big(max(2, rounds // 2), steps)
    result["goals"] = goals(result)
    result["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.time() - started
    return write(result, args.out, args.name, plot)


if __name__ == "__main__":
    main()
