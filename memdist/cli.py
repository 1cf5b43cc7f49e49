"""The ``memdist`` command line: ``train`` and ``eval``; the last stdout line is JSON.

memdist train [CONFIG] [--set key=value ...] [--run-dir DIR [--overwrite]] [--shards M]
              [--workers N]
memdist eval RUN_DIR
memdist checkpoint ls|verify URI | export URI OUT
memdist generate URI --prompt TEXT
memdist cluster up|down|status CONFIG | submit TARGET -- CMD ... | logs|stop TARGET JOB
memdist configs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from memdist.errors import ConfigError, MemdistError


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memdist", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a config (default: the small memory config)")
    t.add_argument(
        "config", nargs="?", default=None, help="named config (small, dense, ...) or YAML path"
    )
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.dim=256 (repeatable)",
    )
    t.add_argument(
        "--shards",
        type=int,
        default=None,
        metavar="M",
        help="shard servers per value table (0: a local table in the worker)",
    )
    t.add_argument(
        "--plan",
        choices=["row", "column", "auto"],
        default=None,
        help="sharding plan (auto: the one moving fewer bytes)",
    )
    t.add_argument(
        "--transport",
        choices=["ray", "collective", "inprocess"],
        default=None,
        help="how requests reach the shards",
    )
    t.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel backbone workers (Ray Train); more than 1 needs --shards > 0",
    )
    t.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: auto or ray://HOST:PORT (default: start a local instance)",
    )
    t.add_argument(
        "--max-failures",
        type=int,
        default=None,
        metavar="K",
        help="recover from K failures (a shard, worker or node) from the last checkpoint",
    )
    t.add_argument(
        "--deepspeed",
        default=None,
        metavar="DS_JSON",
        help="your DeepSpeed JSON as the engine config (memdist fills batch sizes, precision)",
    )
    t.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run folder (default runs/NAME-TIME); new or empty",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="empty the run folder first if it holds an earlier run (only that folder's contents)",
    )
    t.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="URI",
        help="save checkpoints to this folder or s3://bucket/prefix (train.checkpoint.*)",
    )
    t.add_argument(
        "--resume",
        default=None,
        metavar="URI",
        help="continue from this checkpoint, or 'latest' in --checkpoint-dir",
    )
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e = sub.add_parser("eval", help="evaluate a finished run folder or a checkpoint")
    e.add_argument("run_dir", help="a run folder, or a checkpoint (folder or s3://)")
    e.add_argument("--endpoint-url", default=None, help="an S3-compatible store's endpoint")
    e.add_argument("--max-table-mb", type=float, default=None,
                   help="largest table read into this process (else: shard servers)")  # fmt: skip
    g = sub.add_parser("generate", help="continue a prompt with a checkpoint's model")
    g.add_argument("uri", help="a checkpoint (folder or s3://)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--endpoint-url", default=None)
    g.add_argument("--max-table-mb", type=float, default=None)
    sub.add_parser("configs", help="list the named configs")
    c = sub.add_parser("checkpoint", help="list, verify or export checkpoints")
    c.add_argument("action", choices=["ls", "verify", "export"])
    c.add_argument("uri", help="a checkpoint folder (ls) or one checkpoint (verify, export)")
    c.add_argument("out", nargs="?", type=Path, help="export: the folder to write")
    c.add_argument("--endpoint-url", default=None, help="an S3-compatible store's endpoint")
    c.add_argument("--max-table-mb", type=float, default=None,
                   help="export: refuse a table larger than this (it is gathered here)")  # fmt: skip
    k = sub.add_parser("cluster", help="start, stop and use a Ray cluster (cloud or local)")
    kk = k.add_subparsers(dest="action", required=True)
    for name, what in (("up", "start or update"), ("down", "tear down")):
        a = kk.add_parser(name, help=f"{what} the cluster of a cluster file (Ray's launcher)")
        a.add_argument("config", help="a cluster file, or a shipped one: aws, gcp, local-fake")
    a = kk.add_parser("status", help="nodes and resources (ray status)")
    a.add_argument("target", help="a cluster file, or the address HOST:PORT of a running head")
    a = kk.add_parser(
        "submit", help="run a command as a Ray job, stream its logs, return its status"
    )
    a.add_argument("target", help="a cluster file, or the job API's address http://HOST:8265")
    a.add_argument("--working-dir", default=None, help="upload this folder for the job")
    a.add_argument("--no-wait", action="store_true", help="return once submitted")
    a.add_argument(
        "job_command", nargs=argparse.REMAINDER, metavar="-- CMD", help="memdist train ..."
    )
    for name in ("logs", "stop"):
        a = kk.add_parser(name, help=f"{name} of a submitted job")
        a.add_argument("target", help="a cluster file, or the job API's address")
        a.add_argument("job", help="the job's id, as submit printed it")
        if name == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends")
    return p


def cluster_command(args: argparse.Namespace) -> int:
    from memdist.cluster import jobs, launcher

    if args.action == "up":
        return launcher.up(args.config)
    if args.action == "down":
        return launcher.down(args.config)
    if args.action == "status":
        return launcher.status(args.target)
    if args.action == "submit":
        command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
        return jobs.submit(args.target, command, working_dir=args.working_dir,
                           wait=not args.no_wait)  # fmt: skip
    if args.action == "logs":
        return jobs.logs(args.target, args.job, follow_logs=args.follow)
    return jobs.stop(args.target, args.job)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Quiet third-party start-up chatter; our own progress goes to stderr via tqdm.
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    try:
        if args.command == "configs":
            from memdist.config import CONFIG_DIR

            for path in sorted(CONFIG_DIR.glob("*.yaml")):
                print(path.stem)
            return 0
        if args.command == "cluster":
            return cluster_command(args)
        if args.command == "train":
            from memdist.config import load_config
            from memdist.runlog import default_run_dir
            from memdist.train import train

            flags = {
                "shards.count": args.shards,
                "shards.plan": args.plan,
                "shards.transport": args.transport,
                "cluster.workers": args.workers,
                "cluster.address": args.address,
                "cluster.max_failures": args.max_failures,
                "train.deepspeed": args.deepspeed,
                "train.checkpoint.dir": args.checkpoint_dir,
                "train.checkpoint.resume": args.resume,
            }
            overrides = args.overrides + [f"{k}={v}" for k, v in flags.items() if v is not None]
            cfg = load_config(args.config, overrides)
            run_dir = args.run_dir or default_run_dir(cfg)
            result = train(cfg, run_dir, progress=not args.no_progress, overwrite=args.overwrite)
            _release_process_group()
        elif args.command == "checkpoint" and args.action == "export":
            from memdist.from_checkpoint import DEFAULT_MAX_TABLE_MB, export

            if args.out is None:
                raise ConfigError("memdist checkpoint export needs an output folder: URI OUT")
            budget = args.max_table_mb or DEFAULT_MAX_TABLE_MB
            result = export(args.uri, args.out, endpoint_url=args.endpoint_url,
                            max_table_mb=budget)  # fmt: skip
        elif args.command == "checkpoint":
            return checkpoint_command(args.action, args.uri, args.endpoint_url)
        elif args.command == "generate":
            from memdist.from_checkpoint import DEFAULT_MAX_TABLE_MB, generate, load_model

            budget = args.max_table_mb or DEFAULT_MAX_TABLE_MB
            with load_model(args.uri, endpoint_url=args.endpoint_url,
                            max_table_mb=budget) as loaded:  # fmt: skip
                text = generate(loaded.model, args.prompt, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, seed=args.seed)  # fmt: skip
            result = {"prompt": args.prompt, "completion": text}
        elif args.run_dir.startswith("s3://") or (Path(args.run_dir) / "manifest.json").is_file():
            from memdist.train import evaluate_checkpoint

            result = evaluate_checkpoint(args.run_dir, endpoint_url=args.endpoint_url,
                                         max_table_mb=args.max_table_mb)  # fmt: skip
        else:
            from memdist.train import evaluate_run

            result = evaluate_run(Path(args.run_dir))
    except MemdistError as exc:
        print(f"memdist: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _disconnect_ray()
    print(json.dumps(_json_safe(result)), flush=True)
    return 0


def _disconnect_ray() -> None:
    """Leave Ray before the result line: Ray prints notices about the cluster (a node that
    died, say) to stdout, and the last line printed must be the JSON result."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def checkpoint_command(action: str, uri: str, endpoint_url: str | None) -> int:
    """``ls``: one JSON line per checkpoint under ``uri`` (an incremental one names the
    save it builds on); ``verify``: every object of the checkpoint at ``uri``, and of the
    saves it builds on, against their manifests, one line per problem, exit 1 if any."""
    from memdist.storage import manifest as mf
    from memdist.storage.targets import open_target

    target = open_target(uri, endpoint_url=endpoint_url)
    if action == "ls":
        for info in mf.list_checkpoints(target):
            row = {"step": info.step, "uri": info.uri, "complete": info.complete,
                   "bytes": info.total_bytes, "objects": info.objects}  # fmt: skip
            if info.complete:
                meta = mf.read_manifest(target.child(info.key)).meta
                row.update(kind=meta.get("kind", "full"), parent=meta.get("parent"))
            print(json.dumps(row))
        return 0
    folder = mf.folder_of(target, endpoint_url=endpoint_url)
    problems = []
    for link, manifest in mf.chain(target, folder=folder):
        problems += mf.verify(link, manifest)
    for problem in problems:
        print(problem)
    print(json.dumps({"uri": target.uri, "ok": not problems, "problems": len(problems)}))
    return 1 if problems else 0


def _release_process_group() -> None:
    """End the one-process group a run in this process set up for DeepSpeed (NCCL warns
    at exit about one left open)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
