"""The run folder: resolved config, metrics.jsonl, weights, final JSON and a loss plot.

Layout of a run folder::

    config.yaml        the resolved config (every value the run used)
    metrics.jsonl      one JSON object per logged train step or evaluation
    model.safetensors  backbone weights (dense parameters)
    values.safetensors value tables and their optimizer state
    final.json         the final metrics, as printed on the last stdout line
    loss.png           training loss (and eval points) against tokens
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from memdist.config import RunConfig, config_from_dict, to_dict
from memdist.errors import CheckpointError


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunLog:
    """Appends metrics to ``metrics.jsonl`` and writes the config and plot of one run."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self._metrics = (self.dir / "metrics.jsonl").open("a")

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def finish(self, final: dict[str, Any]) -> None:
        (self.dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
        self._metrics.close()
        plot_loss(self.dir)


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


def plot_loss(run_dir: Path) -> Path | None:
    """Training loss against tokens seen, with eval loss points; written to loss.png."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss")
    evals = [r for r in records if r.get("kind") == "eval" and "eval_loss" in r]
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
