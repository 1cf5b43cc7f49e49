"""The JSON report of a `benchmarks/gpu_train.sh` call, from the logs it left in its folder.

Each run's log ends with `memdist train`'s final metrics line and begins with its resolved
set-up line; the report holds both, and tokens/s of each memory model as a ratio to its
dense peer of about the same FLOPs, measured in the same call on the same GPU.

    python benchmarks/gpu_train_summary.py LOGS_DIR --out report.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PEERS = {  # run: the run it is compared with
    "local": "dense",
    "inprocess": "dense",
    "scale_small": "scale_dense",
}


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def summary(logs: Path) -> dict:
    gpu = (logs / "gpu.txt").read_text().splitlines()
    tests = (logs / "tests.log").read_text() if (logs / "tests.log").exists() else ""
    counts = re.findall(r"^(\d+ passed.*) in [\d.]+s", tests, re.M)
    runs = {}
    for path in sorted(logs.glob("*.log")):
        lines = json_lines(path)
        if path.stem == "tests" or len(lines) < 2:
            continue
        setup, final = lines[0], lines[-1]
        runs[path.stem] = {"setup": setup, "final": final}
    ratios = {
        f"{run}_vs_{peer}": runs[run]["final"]["tokens_per_s"] / runs[peer]["final"]["tokens_per_s"]
        for run, peer in PEERS.items()
        if run in runs and peer in runs
    }
    return {
        "benchmark": "gpu_train",
        "machine": {"gpu": gpu[1] if len(gpu) > 1 else None},
        "versions": gpu[2] if len(gpu) > 2 else None,
        "tests": counts[-1] if counts else None,
        "tokens_per_s_ratios": ratios,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = summary(args.logs)
    text = json.dumps(result, indent=1)
    print(
        json.dumps({k: result[k] for k in ("machine", "versions", "tests", "tokens_per_s_ratios")})
    )
    if args.out is not None:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
