"""What every benchmark report records and how it is written (shared by the scripts here).

A report is one JSON object: the machine, the library versions, the config and the
results. ``write`` prints it and, given a folder, saves it with its plot there.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import memdist


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),  # OpenMP idle spin (spin.py)
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def versions(*libraries: str) -> dict:
    """Python, torch, memdist and each named library's version (None where it is missing)."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "memdist": memdist.__version__}  # fmt: skip
    for name in libraries:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def write(result: dict, out: Path | None, name: str, plot: Callable[[dict, Path], None]) -> dict:
    """Print ``result``; with ``out``, also save ``out/NAME.json`` and ``out/NAME.png``."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        plot(result, out / f"{name}.png")
    print(json.dumps(result))
    return result
