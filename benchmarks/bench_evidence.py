"""Evidence for the paper's claim at a scale anyone can rerun: factual recall of memory
models against dense models of 1x, 2x and 4x their FLOPs, tables of growing size at flat
FLOPs, equal wall-clock time, and teaching new facts through the memory alone.

Every model trains through ``memdist.train.train`` (as ``memdist train`` does) with a
local value table (``shards.count=0``), one torch thread per run and ``--workers`` runs
at a time, on the built-in corpus scaled by ``data.n_attributes`` and
``data.values_per_attribute``: the same documents in the same order (``data.seed`` is
fixed; ``train.seed`` varies the initialisation) for the same number of tokens. Each
run's weights are then read back and every held-out question is answered by greedy
decoding, so exact match can be bootstrapped over seeds and questions.

    python benchmarks/bench_evidence.py --out benchmarks/reports \\
        --name 2026-11-26-cpu-2core-evidence          # about 30 minutes on 2 cores
    python benchmarks/bench_evidence.py --quick        # a few minutes, a smoke run

Parts (each can be left out): ``main`` (dense 1x/2x/4x and memory tables at flat
FLOPs), ``equal_time`` (dense models given the memory model's training time),
``new_facts`` (new people taught with the backbone frozen, against finetuning the whole
model for the same steps). Claims are answered yes or no by fixed rules over bootstrap
intervals; nothing here is tuned on the outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from report import machine, versions, write

# The backbone: small enough that a run is a minute or two on one CPU thread.
DIM, N_LAYERS, N_HEADS = 64, 4, 4
MEMORY_BLOCK = 2  # the memory layer replaces this block's FFN
N_KEYS = (32, 64, 128, 256)  # tables of 1K, 4K, 16K and 64K rows
K_DIM, MEM_HEADS, KNN = 32, 4, 16
# Dense widths of about 2x and 4x the 1x model's forward FLOPs per token (1.97x, 3.91x).
DENSE_DIMS = {"dense_1x": 64, "dense_2x": 96, "dense_4x": 136}
SEQ_LEN, BATCH = 128, 16
CI = 0.95
BOOTSTRAP = 4000
# Held-out QA (the people whose QA form is never trained on) and cloze (the same facts,
# prompted with a phrasing of the person's biography): extraction and plain recall.
METRICS = {"held_out_qa": "old_qa", "cloze": "old_cloze"}


# -- configs --------------------------------------------------------------------------
def model_overrides(name: str) -> list[str]:
    common = [f"model.n_layers={N_LAYERS}", f"model.n_heads={N_HEADS}"]
    if name in DENSE_DIMS:
        return [*common, "model.memory=null", f"model.dim={DENSE_DIMS[name]}"]
    n_keys = int(name.split("_k")[1])
    return [
        *common,
        f"model.dim={DIM}",
        f"model.memory.layers=[{MEMORY_BLOCK}]",
        f"model.memory.n_keys={n_keys}",
        f"model.memory.k_dim={K_DIM}",
        f"model.memory.heads={MEM_HEADS}",
        f"model.memory.knn={KNN}",
    ]


def memory_names() -> list[str]:
    return [f"memory_k{n}" for n in N_KEYS]


def base_overrides(args: argparse.Namespace, data_dir: Path) -> list[str]:
    """What every run shares: the data, the token budget, one thread, no QA in the run's
    own eval (it is scored here, per question)."""
    return [
        "shards.count=0",
        f"data.cache_dir={data_dir}",
        f"data.n_people={args.people}",
        f"data.n_attributes={args.attributes}",
        f"data.values_per_attribute={args.values}",
        f"data.seq_len={SEQ_LEN}",
        f"data.batch_size={BATCH}",
        "train.max_minutes=null",
        "train.threads=1",
        "train.log_every=10",
        "eval.max_qa=0",
        "eval.ppl_batches=2",
    ]


def schedule(steps: int) -> list[str]:
    return [f"train.steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}"]


# -- one job, in a worker process -------------------------------------------------------
def _normalize(text: str) -> str:
    """SQuAD's answer normalisation (as torchmetrics' SQuAD, which ``memdist eval`` uses)."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _score(model, pairs: Sequence[tuple[str, str]], cloze: bool) -> tuple[list[int], float]:
    """Per-question exact match (0/1) and the mean as memdist's own QA metric gives it.
    A cloze completion runs on into the biography: its first sentence is the answer."""
    from memdist.evaluate import greedy_answers, qa_scores

    preds = greedy_answers(model, [p for p, _ in pairs], max_new_tokens=10, batch_size=64)
    if cloze:
        preds = [p.split(".")[0] for p in preds]
    correct = [int(_normalize(p) == _normalize(a)) for p, (_, a) in zip(preds, pairs, strict=True)]
    em = qa_scores(preds, [a for _, a in pairs])["qa_em"] if pairs else 0.0
    return correct, em


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one config, then score its weights on each of the job's question sets."""
    import torch

    from memdist import checkpoint
    from memdist.assembly import build_model, unique_tables
    from memdist.config import load_config
    from memdist.runlog import read_metrics
    from memdist.train import train

    torch.set_num_threads(1)
    cfg = load_config("small", job["overrides"])
    run_dir = Path(job["run_dir"])
    load0 = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    final = train(cfg, run_dir, progress=False, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    model, tables = build_model(cfg, torch.device("cpu"))
    checkpoint.load_weights(run_dir, model, unique_tables(tables))
    model.eval()
    t1 = time.perf_counter()
    scores = {}
    for name, pairs in job["evals"].items():
        correct, em = _score(model, pairs, cloze=name.endswith("cloze"))
        if abs(em - sum(correct) / max(1, len(correct))) > 1e-6:  # torchmetrics: float32
            raise RuntimeError(f"{name}: per-question EM disagrees with memdist's ({em})")
        scores[name] = correct
    curve = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]
    return {
        "name": job["name"],
        "seed": job["seed"],
        "overrides": job["overrides"],
        "steps": final["step"],
        "tokens": final["tokens"],
        "loss": final["loss"],
        "eval_loss": final["eval_loss"],
        "dense_params": final["dense_params"],
        "value_params": final["value_params"],
        "flops_per_token": final["flops_per_token"],
        "tokens_per_s": final["tokens_per_s"],
        "train_s": final["tokens"] / final["tokens_per_s"],  # time inside training steps
        "wall_s": wall,  # the whole train() call: set-up, steps, its eval, saving
        "cpu_s": cpu,
        "score_s": time.perf_counter() - t1,
        "loadavg_1m": [load0, os.getloadavg()[0]],
        "curve": curve,
        "correct": scores,
    }


def run_jobs(pool: ProcessPoolExecutor, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs on the pool's processes, longest first."""
    jobs = sorted(jobs, key=lambda j: -j["cost"])
    out = []
    futures = [pool.submit(run_job, j) for j in jobs]
    for i, fut in enumerate(as_completed(futures), 1):
        r = fut.result()
        ems = " ".join(f"{k}={np.mean(v):.3f}" for k, v in r["correct"].items())
        print(
            f"[{i}/{len(jobs)}] {r['name']} seed {r['seed']}: {ems} train "
            f"{r['train_s']:.0f}s wall {r['wall_s']:.0f}s",
            file=sys.stderr,
            flush=True,
        )
        out.append(r)
    return out


def _init_worker() -> None:
    """Import and start DeepSpeed's one-process group once per worker, so that no run's
    wall time includes it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from memdist.assembly import init_single_process

    init_single_process()


# -- statistics ---------------------------------------------------------------------------
def _matrix(runs: list[dict[str, Any]], name: str, key: str) -> np.ndarray:
    """Seeds x questions, 0/1."""
    rows = [r["correct"][key] for r in sorted(runs, key=lambda r: r["seed"]) if r["name"] == name]
    return np.array(rows, dtype=np.float64)


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.quantile(samples, [(1 - CI) / 2, (1 + CI) / 2])
    return [float(lo), float(hi)]


class Bootstrap:
    """Resamples seeds (each config on its own: their initialisations are independent)
    and questions (shared: every config answers the same questions) with replacement."""

    def __init__(self, n_questions: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.q = self.rng.integers(n_questions, size=(BOOTSTRAP, n_questions))

    def means(self, m: np.ndarray) -> np.ndarray:
        """EM of each replicate: ``m`` (seeds x questions) resampled both ways."""
        s = self.rng.integers(m.shape[0], size=(BOOTSTRAP, m.shape[0]))
        per_seed = np.stack([m[s[b]][:, self.q[b]].mean() for b in range(BOOTSTRAP)])
        return per_seed

    def summary(self, m: np.ndarray) -> dict[str, Any]:
        return {
            "em": float(m.mean()),
            "ci": _interval(self.means(m)),
            "per_seed": [float(x) for x in m.mean(axis=1)],
        }

    def difference(self, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        d = self.means(a) - self.means(b)
        return {"diff": float(a.mean() - b.mean()), "ci": _interval(d)}

    def slope(self, ms: list[np.ndarray], x: Sequence[float]) -> dict[str, Any]:
        """Least-squares slope of EM against ``x`` (log2 rows), per replicate."""
        reps = np.stack([self.means(m) for m in ms], axis=1)  # replicates x configs
        slopes = np.polyfit(np.asarray(x, dtype=float), reps.T, 1)[0]
        point = np.polyfit(np.asarray(x, dtype=float), [m.mean() for m in ms], 1)[0]
        return {"slope_per_doubling": float(point), "ci": _interval(slopes)}


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.mean(r[key] for r in runs))


def config_rows(
    runs: list[dict[str, Any]], boot: Bootstrap, names: list[str], key: str = "old_qa"
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        rs = [r for r in runs if r["name"] == name]
        if not rs:
            continue
        row = {
            "config": name,
            "seeds": len(rs),
            "steps": rs[0]["steps"],
            "tokens": rs[0]["tokens"],
            "qa": boot.summary(_matrix(runs, name, key)),
            "eval_loss": _mean(rs, "eval_loss"),
            "eval_loss_sd": float(np.std([r["eval_loss"] for r in rs])),
            "train_loss": _mean(rs, "loss"),
            "dense_params": rs[0]["dense_params"],
            "value_params": rs[0]["value_params"],
            "flops_per_token": rs[0]["flops_per_token"],
            "tokens_per_s": _mean(rs, "tokens_per_s"),
            "train_s": _mean(rs, "train_s"),
            "cpu_s": _mean(rs, "cpu_s"),
            "wall_s": _mean(rs, "wall_s"),
        }
        if any("old_cloze" in r["correct"] for r in rs):
            row["cloze"] = boot.summary(_matrix(runs, name, "old_cloze"))
        rows.append(row)
    return rows


# -- the experiment -------------------------------------------------------------------------
def regime(args: argparse.Namespace, corpus, dense_params: int) -> dict[str, Any]:
    """The numbers the regime is chosen by (see the report): facts against what the dense
    backbone could hold, and how often each fact is read in the token budget."""
    from memdist.data.corpus import chance_baseline

    summary = corpus.summary()
    facts = args.people * args.attributes
    fact_bits = facts * math.log2(args.values)
    epoch_tokens = summary["train_bytes"] + summary["train_docs"]  # bytes + one EOS each
    tokens = args.steps * BATCH * SEQ_LEN
    epochs = tokens / epoch_tokens
    return {
        "people": args.people,
        "attributes": args.attributes,
        "values_per_attribute": args.values,
        "facts": facts,
        "fact_bits": fact_bits,
        "dense_1x_params": dense_params,
        # Allen-Zhu & Li (2024): about 2 bits per parameter after 1000 exposures, 1 after 100.
        "fact_bits_per_dense_param": fact_bits / dense_params,
        "facts_needed_to_fill_1x_at_2_bits_per_param": 2 * dense_params / math.log2(args.values),
        "tokens_per_epoch": epoch_tokens,
        "train_tokens": tokens,
        "epochs": epochs,
        "biography_reads_per_fact": epochs * corpus.params["n_bio_variants"],
        "qa_chance_em": chance_baseline(corpus),
        "held_out_questions": len(corpus.qa_eval),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400, help="training steps of every main run")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--people", type=int, default=24)
    p.add_argument("--new-people", type=int, default=12)
    p.add_argument("--attributes", type=int, default=8)
    p.add_argument("--values", type=int, default=64, help="values per attribute")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--parts", default="main,equal_time,new_facts")
    p.add_argument("--only", default=None, help="comma-separated configs of the main part")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--name", default="evidence")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temp dir)")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="redraw the plots and tables of a finished run's JSON into --out",
    )
    args = p.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result.update(summarize(result))
        out = args.out or args.from_json.parent
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        plot(result, out / f"{args.name}.png")
        write_markdown(out / f"{args.name}.md", markdown(result, args.name))
        return result
    if args.quick:
        args.seeds, args.steps, args.finetune_steps = 2, 30, 10
        args.people, args.new_people = 16, 4
    parts = set(args.parts.split(","))
    if not parts <= {"main", "equal_time", "new_facts"}:
        raise SystemExit(f"--parts={args.parts!r}: main, equal_time, new_facts")
    started = time.time()
    load_start = os.getloadavg()
    ctx = mp.get_context("spawn")  # torch must not be forked
    with (
        tempfile.TemporaryDirectory(prefix="bench-evidence-") as tmp,
        ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker) as pool,
    ):
        result = experiment(args, parts, args.work or Path(tmp), pool)
    result.update(
        {
            "date": time.strftime("%Y-%m-%d", time.localtime(started)),
            "seconds": time.time() - started,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        }
    )
    out = write(result, args.out, args.name, plot)
    if args.out is not None:
        write_markdown(args.out / f"{args.name}.md", markdown(result, args.name))
    return out


BEGIN, END = "<!-- generated by bench_evidence.py: begin -->", "<!-- generated: end -->"


def write_markdown(path: Path, generated: str) -> None:
    """Put the generated tables between the markers of an existing report (the text
    around them is written by hand and kept), or start a report with them."""
    text = path.read_text() if path.is_file() else f"# Evidence\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{generated}\n{END}{tail}")


def experiment(
    args: argparse.Namespace, parts: set[str], work: Path, pool: ProcessPoolExecutor
) -> dict[str, Any]:
    from memdist.config import load_config
    from memdist.data.corpus import generate_corpus
    from memdist.data.parquet import write_corpus
    from memdist.model import flops_per_token

    data_dir = work / "data"
    base = base_overrides(args, data_dir)
    old = generate_corpus(
        args.people, n_attributes=args.attributes, values_per_attribute=args.values, seed=0
    )
    # New people: the same kinds of facts, other names, their own seed.
    new = generate_corpus(
        args.new_people,
        n_attributes=args.attributes,
        values_per_attribute=args.values,
        seed=1,
        exclude_names=frozenset(p.name for p in old.people),
    )
    new_paths = write_corpus(new, work / "new_people")
    evals = {
        "old_qa": [(q.prompt, q.answer) for q in old.qa_eval],
        "old_cloze": [(q.prompt, q.answer) for q in old.cloze_eval],
    }
    new_evals = {
        "new_qa": [(q.prompt, q.answer) for q in new.qa_eval],
        "new_cloze": [(q.prompt, q.answer) for q in new.cloze_eval],
    }

    names = list(DENSE_DIMS) + memory_names()
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    flops = {
        n: flops_per_token(load_config("small", base + model_overrides(n)).model, SEQ_LEN)
        for n in list(DENSE_DIMS) + memory_names()
    }
    # The memory model of the dense 1x model's FLOPs: the table whose FLOPs are closest.
    headline = min(
        memory_names(), key=lambda n: abs(flops[n]["forward"] - flops["dense_1x"]["forward"])
    )
    seeds = list(range(args.seeds))

    def job(name: str, seed: int, extra: list[str], evals_of: dict, tag: str = "") -> dict:
        full = f"{name}{tag}"
        return {
            "name": full,
            "seed": seed,
            "run_dir": str(work / "runs" / f"{full}-s{seed}"),
            "overrides": base + model_overrides(name) + [f"train.seed={seed}"] + extra,
            "evals": evals_of,
            "cost": flops[name]["forward"] * (2.5 if "memory" in name else 1),
        }

    runs: list[dict[str, Any]] = []
    if "main" in parts:
        jobs = []
        for name in names:
            ev = evals | new_evals if name == headline else evals
            jobs += [job(name, s, schedule(args.steps), ev) for s in seeds]
        runs += run_jobs(pool, jobs)

    equal_time = {}
    if "equal_time" in parts and any(r["name"] == headline for r in runs):
        # Time is each run's CPU seconds (one thread): on a shared machine the wall clock
        # measures the neighbours too; alone, the two are the same.
        t_mem = statistics.median(r["cpu_s"] for r in runs if r["name"] == headline)
        jobs = []
        for name in ("dense_1x", "dense_2x"):
            ts = [r["cpu_s"] for r in runs if r["name"] == name]
            if not ts:
                continue
            t = statistics.median(ts)
            # A dense model slower than the memory model already had at least its time.
            steps = round(args.steps * t_mem / t) if t < 0.9 * t_mem else args.steps
            equal_time[name] = {"cpu_s": t, "memory_cpu_s": t_mem, "steps": steps}
            if steps != args.steps:
                jobs += [job(name, s, schedule(steps), evals, "_equal_time") for s in seeds]
        runs += run_jobs(pool, jobs)

    finetune = []
    if "new_facts" in parts and any(r["name"] == headline for r in runs):
        extra = [
            f"data.source={new_paths['train']}",
            f"data.qa_eval={new_paths['qa_eval']}",
            *schedule(args.finetune_steps),
        ]
        jobs = []
        for s in seeds:
            init = [f"train.init_from={work / 'runs' / f'{headline}-s{s}'}"]
            ev = evals | new_evals
            jobs.append(
                job(
                    headline,
                    s,
                    extra + init + ["train.freeze_backbone=true"],
                    ev,
                    "_new_facts_memory_only",
                )
            )
            jobs.append(job(headline, s, extra + init, ev, "_new_facts_whole_model"))
        finetune = run_jobs(pool, jobs)

    dense_params = next((r["dense_params"] for r in runs if r["name"] == "dense_1x"), None)
    result = {
        "benchmark": "evidence",
        "machine": machine() | {"torch_threads_per_run": 1, "runs_at_a_time": args.workers},
        "versions": versions("deepspeed", "torchmetrics"),
        "config": {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "parts": sorted(parts),
            "backbone": {
                "dim": DIM,
                "n_layers": N_LAYERS,
                "n_heads": N_HEADS,
                "dense_dims": DENSE_DIMS,
                "memory_block": MEMORY_BLOCK,
                "n_keys": N_KEYS,
                "k_dim": K_DIM,
                "heads": MEM_HEADS,
                "knn": KNN,
            },
            "seq_len": SEQ_LEN,
            "batch_size": BATCH,
            "headline_memory": headline,
            "overrides": {n: base + model_overrides(n) for n in list(DENSE_DIMS) + memory_names()},
            # Every run adds train.seed and train.steps / optim.warmup_steps (steps // 10);
            # new-facts runs add their data, train.init_from and train.freeze_backbone.
            "resolved_headline": _resolved(base + model_overrides(headline) + schedule(args.steps)),
            "bootstrap": {
                "replicates": BOOTSTRAP,
                "interval": CI,
                "resampled": "seeds within each config, questions shared",
            },
        },
        "regime": regime(args, old, dense_params or 0),
        "flops": {n: f["forward"] for n, f in flops.items()},
        "equal_time": equal_time,
        "runs": runs + finetune,
    }
    return result | summarize(result)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The tables, claims and comparisons, from the runs' per-question results alone (so
    ``--from-json`` recomputes them exactly: every bootstrap is seeded)."""
    runs = [r for r in result["runs"] if "new_facts" not in r["name"]]
    finetune = [r for r in result["runs"] if "new_facts" in r["name"]]
    headline, equal_time = result["config"]["headline_memory"], result["equal_time"]
    boot = Bootstrap(len(runs[0]["correct"]["old_qa"]))
    order = list(DENSE_DIMS) + memory_names() + [f"{n}_equal_time" for n in DENSE_DIMS]
    out = {
        "table": config_rows(runs, boot, order),
        "claims": {
            metric: answer_claims(runs, boot, headline, equal_time, key)
            for metric, key in METRICS.items()
        },
        "new_facts": {
            metric: new_facts_summary(runs, finetune, headline, metric)
            for metric in ("qa", "cloze")
        }
        if finetune
        else {},
    }
    # Not a claim of the paper, a reference: the memory model against the dense model of
    # its own FLOPs (own generator, so the numbers above do not depend on it).
    have = {r["name"] for r in runs}
    if {headline, "dense_1x"} <= have:
        ref = Bootstrap(len(runs[0]["correct"]["old_qa"]), seed=3)
        out["memory_vs_dense_1x"] = {
            metric: ref.difference(_matrix(runs, headline, key), _matrix(runs, "dense_1x", key))
            for metric, key in METRICS.items()
        }
    return out


def _resolved(overrides: list[str]) -> dict[str, Any]:
    from memdist.config import load_config, to_dict

    return to_dict(load_config("small", overrides))


def answer_claims(
    runs, boot: Bootstrap, headline: str, equal_time: dict, key: str
) -> dict[str, Any]:
    """Yes only when the bootstrap interval of the difference (or slope) is above zero."""
    have = {r["name"] for r in runs}
    m = _matrix(runs, headline, key) if headline in have else None
    out: dict[str, Any] = {}
    if m is not None and "dense_2x" in have:
        d = boot.difference(m, _matrix(runs, "dense_2x", key))
        out["a_memory_beats_dense_2x"] = {**d, "answer": d["ci"][0] > 0}
    mems = [n for n in memory_names() if n in have]
    if len(mems) >= 2:
        x = [2 * math.log2(int(n.split("_k")[1])) for n in mems]  # log2 rows
        s = boot.slope([_matrix(runs, n, key) for n in mems], x)
        out["b_recall_rises_with_table_rows"] = {**s, "configs": mems, "answer": s["ci"][0] > 0}
    if m is not None and equal_time:
        rivals = {}
        for name in equal_time:
            rival = f"{name}_equal_time" if f"{name}_equal_time" in have else name
            d = boot.difference(m, _matrix(runs, rival, key))
            rivals[rival] = {**d, "answer": d["ci"][0] > 0}
        out["c_memory_wins_at_equal_time"] = {
            "against": rivals,
            "answer": all(v["answer"] for v in rivals.values()),
        }
    return out


def new_facts_summary(runs, finetune, headline: str, metric: str) -> dict[str, Any]:
    """``metric`` (qa or cloze) of the new and the old people's held-out facts before (the
    trained memory model) and after each way of teaching the new people."""
    old_key, new_key = f"old_{metric}", f"new_{metric}"
    boot_old = Bootstrap(len(runs[0]["correct"][old_key]), seed=1)
    boot_new = Bootstrap(len(finetune[0]["correct"][new_key]), seed=2)
    before_old = _matrix(runs, headline, old_key)
    out: dict[str, Any] = {
        "before": {
            "old": boot_old.summary(before_old),
            "new": boot_new.summary(_matrix(runs, headline, new_key)),
        }
    }
    after = {}
    for way in ("memory_only", "whole_model"):
        name = f"{headline}_new_facts_{way}"
        rs = [r for r in finetune if r["name"] == name]
        after[way] = {k: _matrix(finetune, name, f"{k}_{metric}") for k in ("old", "new")}
        out[way] = {
            "old": boot_old.summary(after[way]["old"]),
            "new": boot_new.summary(after[way]["new"]),
            "forgetting": boot_old.difference(before_old, after[way]["old"]),
            "steps": rs[0]["steps"],
            "cpu_s": _mean(rs, "cpu_s"),
            "tokens_per_s": _mean(rs, "tokens_per_s"),
            "curve": rs[0]["curve"],
        }
    out["memory_only_minus_whole_model"] = {
        k: (boot_old if k == "old" else boot_new).difference(
            after["memory_only"][k], after["whole_model"][k]
        )
        for k in ("old", "new")
    }
    return out


# -- plots and the markdown report ---------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["config"]: r for r in result["table"] if "equal_time" not in r["config"]}
    chance = result["regime"]["qa_chance_em"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    metrics = (("qa", "held-out QA", "-"), ("cloze", "cloze", ":"))

    def errors(rs, key):
        return [
            [r[key]["em"] - r[key]["ci"][0] for r in rs],
            [r[key]["ci"][1] - r[key]["em"] for r in rs],
        ]

    ax = axes[0, 0]
    for key, label, ls in metrics:
        for group, marker, color in (("dense", "o", "C0"), ("memory", "s", "C1")):
            pts = [r for n, r in rows.items() if n.startswith(group) and key in r]
            if not pts:
                continue
            x = [r["flops_per_token"] / 1e6 for r in pts]
            ax.errorbar(
                x,
                [r[key]["em"] for r in pts],
                yerr=errors(pts, key),
                capsize=3,
                fmt=marker + (ls if group == "dense" else ""),
                color=color,
                mfc="white" if key == "cloze" else color,
                label=f"{group}, {label}",
            )
    ax.axhline(chance, color="gray", ls="--", lw=0.8, label="chance (QA)")
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per token (M); memory points are the 4 tables")
    ax.set_ylabel("exact match")
    ax.set_title("recall vs FLOPs (95% CI over seeds and questions)")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    mems = [r for n, r in rows.items() if n.startswith("memory")]
    for key, label, ls in metrics:
        if mems and key in mems[0]:
            x = [int(r["config"].split("_k")[1]) ** 2 for r in mems]
            ax.errorbar(
                x,
                [r[key]["em"] for r in mems],
                yerr=errors(mems, key),
                fmt="s" + ls,
                capsize=3,
                color="C1",
                mfc="white" if key == "cloze" else "C1",
                label=f"memory, {label}",
            )
        for name, color in (("dense_1x", "C0"), ("dense_2x", "C2"), ("dense_4x", "C3")):
            if name in rows and key in rows[name]:
                ax.axhline(
                    rows[name][key]["em"], color=color, ls=ls, lw=1, label=f"{name}, {label}"
                )
    ax.axhline(chance, color="gray", ls="--", lw=0.8, label="chance (QA)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("value table rows (flat FLOPs)")
    ax.set_ylabel("exact match")
    ax.set_title("recall vs table rows")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1, 0]
    curves: dict[str, list] = {}
    for r in result["runs"]:
        if "new_facts" not in r["name"]:
            curves.setdefault(r["name"], []).append(r["curve"])
    for name, cs in curves.items():
        n = min(len(c) for c in cs)
        steps = [c[0] for c in cs[0][:n]]
        loss = np.mean([[c[1] for c in cv[:n]] for cv in cs], axis=0)
        ax.plot(steps, loss, label=name, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("loss curves")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    nf = result.get("new_facts") or {}
    if nf:
        labels = ["before", "memory_only", "whole_model"]
        bars = [(m, k) for m in ("qa", "cloze") for k in ("old", "new")]
        width = 0.8 / len(bars)
        for j, (metric, who) in enumerate(bars):
            cells = [nf[metric][w][who] for w in labels]
            err = [[c["em"] - c["ci"][0] for c in cells], [c["ci"][1] - c["em"] for c in cells]]
            ax.bar(
                np.arange(3) + width * j,
                [c["em"] for c in cells],
                width,
                yerr=err,
                capsize=2,
                label=f"{who} people, {'held-out QA' if metric == 'qa' else 'cloze'}",
            )
        ax.set_xticks(
            np.arange(3) + 0.4 - width / 2,
            ["before", "values only\n(backbone frozen)", "whole model"],
        )
        ax.set_ylabel("exact match")
        ax.set_title("teaching new people: new facts and forgetting")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ci(s: dict[str, Any]) -> str:
    return f"{s['em']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"


def _diff(s: dict[str, Any]) -> str:
    return f"{s['diff']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"


def _yes(answer: bool) -> str:
    return "**yes**" if answer else "**no**"


def markdown(result: dict[str, Any], name: str) -> str:
    """The tables and answers of the report, regenerated from the JSON."""
    g = result["regime"]
    lines = [
        f"Measured {result['date']}, {result['seconds'] / 60:.1f} minutes, load average "
        f"{result['loadavg_start'][0]:.2f} at the start and {result['loadavg_end'][0]:.2f} at "
        f"the end (1-minute; {result['machine']['cpu_count']} cores, shared).",
        "",
        "| config | steps | tokens | held-out QA EM [95% CI] | cloze EM [95% CI] | eval loss "
        "| dense params | value params | fwd FLOPs/token | tokens/s | train s | CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["table"]:
        cloze = _ci(r["cloze"]) if "cloze" in r else "-"
        lines.append(
            f"| {r['config']} | {r['steps']} | {r['tokens']:,} | {_ci(r['qa'])} | {cloze} | "
            f"{r['eval_loss']:.3f} ± {r['eval_loss_sd']:.3f} | {r['dense_params']:,} | "
            f"{r['value_params']:,} | {r['flops_per_token'] / 1e6:.3f}M | "
            f"{r['tokens_per_s']:,.0f} | {r['train_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['wall_s']:.0f} |"
        )
    lines += [
        "",
        f"Means over {result['config']['args']['seeds']} seeds. Chance EM (each attribute's "
        f"majority answer): {g['qa_chance_em']:.3f}; {g['held_out_questions']} held-out "
        "questions (and as many cloze prompts) per model. tokens/s and train s are wall "
        "time inside training steps; CPU s is the whole training call's CPU time (one "
        "thread), which the machine's other tenants do not inflate.",
        "",
        "| claim | metric | measured [95% CI] | answer |",
        "|---|---|---|---|",
    ]
    for metric, c in result["claims"].items():
        label = "held-out QA EM" if metric == "held_out_qa" else "cloze EM"
        if "a_memory_beats_dense_2x" in c:
            a = c["a_memory_beats_dense_2x"]
            lines.append(
                f"| (a) memory beats the 2x-FLOPs dense model | {label} | "
                f"difference {_diff(a)} | {_yes(a['answer'])} |"
            )
        if "b_recall_rises_with_table_rows" in c:
            b = c["b_recall_rises_with_table_rows"]
            lines.append(
                f"| (b) recall rises with table rows at flat FLOPs | {label} | slope "
                f"{b['slope_per_doubling']:+.4f} per doubling of rows [{b['ci'][0]:+.4f}, "
                f"{b['ci'][1]:+.4f}] | {_yes(b['answer'])} |"
            )
        if "c_memory_wins_at_equal_time" in c:
            cc = c["c_memory_wins_at_equal_time"]
            vs = "; ".join(f"vs {k}: {_diff(v)}" for k, v in cc["against"].items())
            lines.append(
                f"| (c) memory wins at equal training time | {label} | {vs} | "
                f"{_yes(cc['answer'])} |"
            )
    if "memory_vs_dense_1x" in result:
        ref = result["memory_vs_dense_1x"]
        lines += [
            "",
            f"For reference (not a claim): {result['config']['headline_memory']} "
            "minus the dense model of the same FLOPs (dense_1x): held-out QA "
            f"{_diff(ref['held_out_qa'])}, cloze {_diff(ref['cloze'])}.",
        ]
    if result["equal_time"]:
        lines += [
            "",
            "Equal time: "
            + "; ".join(
                f"{k} took {v['cpu_s']:.0f} CPU s for {result['config']['args']['steps']} steps "
                f"against the memory model's {v['memory_cpu_s']:.0f}, so it was given {v['steps']} "
                "steps"
                for k, v in result["equal_time"].items()
            )
            + ".",
        ]
    nf = result.get("new_facts") or {}
    if nf:
        lines += [
            "",
            "| teaching new people | metric | new people [95% CI] | old people [95% CI] "
            "| forgetting (old: before - after) | CPU s |",
            "|---|---|---|---|---|---|",
        ]
        for metric, label in (("qa", "held-out QA EM"), ("cloze", "cloze EM")):
            m = nf[metric]
            lines.append(
                f"| before (the trained memory model) | {label} | "
                f"{_ci(m['before']['new'])} | {_ci(m['before']['old'])} | - | - |"
            )
            for way, text in (
                ("memory_only", "values only, backbone frozen"),
                ("whole_model", "whole model"),
            ):
                w = m[way]
                lines.append(
                    f"| {text}, {w['steps']} steps | {label} | {_ci(w['new'])} | "
                    f"{_ci(w['old'])} | {_diff(w['forgetting'])} | {w['cpu_s']:.0f} |"
                )
        for metric, label in (("qa", "held-out QA"), ("cloze", "cloze")):
            d = nf[metric]["memory_only_minus_whole_model"]
            lines.append(
                f"\nValues only minus whole model, {label}: new people "
                f"{_diff(d['new'])}, old people {_diff(d['old'])}."
            )
    lines += ["", f"![recall vs FLOPs, recall vs table rows, loss curves, forgetting]({name}.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
