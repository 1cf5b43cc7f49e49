"""The run folder: resolved config, metrics.jsonl, weights, final JSON and a loss plot.

Layout of a run folder::

    config.yaml        the resolved config (every value the run used)
    metrics.jsonl      one JSON object per logged train step or evaluation
    model.safetensors  backbone weights (dense parameters)
    values.safetensors value tables and their optimizer state
    final.json         the final metrics, as printed on the last stdout line
    loss.png           training loss (and eval points) against tokens

A folder holds one run: a run refuses a non-empty folder (``--overwrite`` empties it).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from memdist.config import RunConfig, config_from_dict, to_dict
from memdist.errors import CheckpointError


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_run_dir(run_dir: Path, *, overwrite: bool = False) -> None:
    """Make ``run_dir`` an empty folder for one run, or raise before anything is written.

    A run folder holds exactly one run: appending a second run's records to
    ``metrics.jsonl`` (and overwriting its ``final.json`` and weights) would leave a
    folder that describes neither run. ``overwrite`` empties it first, but only a
    folder that is a run folder (it has a ``config.yaml``) and does not hold the
    working directory, so a mistyped ``--run-dir`` cannot wipe unrelated files.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} is a file, not a folder")
    entries = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    if entries and not overwrite:
        names = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(
            f"run folder {str(run_dir)!r} is not empty ({names}): a run folder holds one "
            "run, and a new run would mix its records into the old one's. Choose another "
            "--run-dir, or pass --overwrite to empty this folder first"
        )
    if entries:
        resolved = run_dir.resolve()
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise CheckpointError(
                f"--overwrite would empty {str(run_dir)!r}, which holds the working "
                "directory; give the run its own folder"
            )
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(
                f"--overwrite empties only run folders, and {str(run_dir)!r} has no "
                "config.yaml (it holds no memdist run); empty it yourself or choose "
                "another --run-dir"
            )
        for entry in entries:  # the folder itself stays, with its permissions
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


class RunLog:
    """Writes the config, metrics (``metrics.jsonl``) and plot of one run into its own
    folder; ``overwrite`` empties a folder that already holds a run (``claim_run_dir``)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, *, overwrite: bool = False) -> None:
        self.dir = Path(run_dir)
        claim_run_dir(self.dir, overwrite=overwrite)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self._metrics = (self.dir / "metrics.jsonl").open("a")

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def finish(self, final: dict[str, Any]) -> None:
        (self.dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
        self.close()
        plot_loss(self.dir)

    def close(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()


Sink = Callable[[dict[str, Any]], None]


def _spans(cores: list[int]) -> str:
    """Cores as runs: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


class RunReport:
    """The run folder and what the user sees: records from the (lead) worker are logged
    to ``metrics.jsonl`` and shown as a progress bar and lines on stderr.

    Record kinds: ``start`` (header), ``placement`` (where a worker or shard runs),
    ``tick`` (a step finished; bar only), ``train``, ``eval``, ``checkpoint`` (a save
    begun: step and URI), ``checkpoint_done`` (it is complete: kind, bytes, throughput), ``checkpoint_failed``,
    ``recovery`` (the run went back to a checkpoint after a failure: cause, steps
    trained again, seconds lost; records of the workers after a recovery carry ``attempt``),
    ``message`` (a line
    for the user; not logged).
    """

    def __init__(
        self, run_dir: Path, cfg: RunConfig, *, progress: bool = True, overwrite: bool = False
    ) -> None:
        self.dir = Path(run_dir)
        self.log = RunLog(self.dir, cfg, overwrite=overwrite)  # first: refuses a used folder
        self.cfg = cfg
        self.progress = progress
        self._bar: tqdm | None = None

    @property
    def bar(self) -> tqdm:
        """The progress bar, drawn from the first step on (start-up has its own lines)."""
        if self._bar is None:
            # In a log file (no terminal) redraw rarely, so the log stays readable.
            self._bar = tqdm(
                total=self.cfg.train.steps, desc=self.cfg.name, unit="step",
                disable=not self.progress, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0,
            )  # fmt: skip
        return self._bar

    def message(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def handle(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "message":
            self.message(record["text"])
            return
        if kind == "tick":
            self.bar.update(record["step"] - self.bar.n)
            return
        self.log.log(record)
        if kind == "recovery":
            self.message(
                f"recovered from a failure ({record['cause']}): every shard and worker went "
                f"back to step {record['from_step']} ({record['uri']}); {record['steps_redone']} "
                f"steps are trained again; training stood still {record['seconds']:.1f} s"
            )
        elif kind == "placement":
            who = (
                f"worker {record['worker']}"
                if record["role"] == "worker"
                else f"shard {record['shard']}"
            )
            node = f" node {record['node']}" if "node" in record else ""
            threads = f" threads {record['threads']}" if "threads" in record else ""
            cores = f" cores {_spans(record['cores'])}" if record.get("cores") else ""
            self.message(
                f"{who}: host {record['host']}{node} pid {record['pid']} device "
                f"{record['device']}{threads}{cores}"
            )
        elif kind == "start":
            self.message(json.dumps({k: v for k, v in record.items() if k != "kind"}))
            for note in record.get("deepspeed_overrides", []):
                self.message(f"deepspeed config: memdist set {note}")
        elif kind == "train":
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
        elif kind == "checkpoint":
            self.message(f"checkpoint of step {record['step']} begun at {record['uri']}")
        elif kind == "checkpoint_failed":
            self.message(record["error"])
        elif kind == "checkpoint_done":
            mb = record["table_bytes"] / 2**20
            self.message(
                f"checkpoint of step {record['step']} complete ({record['save']}): "
                f"{mb:.1f} MB of tables in {record['seconds']:.1f} s ({record['mb_per_s']} MB/s)"
            )
        elif kind == "eval":
            keys = ("step", "eval_loss", "qa_em", "qa_f1")
            self.message(json.dumps({k: record[k] for k in keys if k in record}))

    def finish(self, final: dict[str, Any]) -> dict[str, Any]:
        """Write final.json and the loss plot; returns ``final`` with the run folder."""
        if self._bar is not None:
            self._bar.close()
        final = {**final, "run_dir": str(self.dir)}
        self.log.finish(final)
        return final

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.log.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run folder: {path.name} is missing")
    return config_from_dict(yaml.safe_load(path.read_text()))


def latest_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last written: after a recovery the steps trained again
    replace those of the attempt that failed."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(run_dir: Path) -> Path | None:
    """Training loss against tokens seen, with eval loss points; written to loss.png."""
    records = read_metrics(run_dir)
    train = latest_per_step([r for r in records if r.get("kind") == "train"])
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss")
    evals = latest_per_step([r for r in records if r.get("kind") == "eval" and "eval_loss" in r])
    if evals:
        ax.plot(
            [r["tokens"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            label="held-out loss",
        )
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).name)
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
