"""The one import namespace: kernels/, cluster/, storage/ import as memdist.* from an
editable install and from a built wheel, and the wheel carries the named configs."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import json, memdist, memdist.kernels, memdist.cluster, memdist.storage, memdist.data, "
    "memdist.config as c; "
    "print(json.dumps({m.__name__: m.__file__ for m in (memdist, memdist.kernels, "
    "memdist.cluster, memdist.storage)} | "
    "{'configs': sorted(p.stem for p in c.CONFIG_DIR.glob('*.yaml'))}))"
)


def probe(cwd: Path, env_extra: dict[str, str] | None = None) -> dict:
    import json

    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_installed_package_maps_the_top_level_folders(tmp_path):
    files = probe(tmp_path)
    assert Path(files["memdist.kernels"]).parent.name == "kernels"
    assert Path(files["memdist.cluster"]).parent.name == "cluster"
    assert Path(files["memdist.storage"]).parent.name == "storage"
    assert {"small", "dense"} <= set(files["configs"])


def test_no_generic_top_level_kernels_module(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import kernels"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0


@pytest.mark.slow
def test_built_wheel_imports(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("memdist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "memdist/kernels/__init__.py" in names and "memdist/configs/small.yaml" in names
    assert "memdist/kernels/cpp_kernels.cpp" in names  # cpp_ops builds it on first use
    assert not any(n.startswith(("tests/", "kernels/", "benchmarks/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    files = probe(tmp_path, {"PYTHONPATH": str(site)})
    for name in ("memdist", "memdist.kernels", "memdist.cluster", "memdist.storage"):
        assert Path(files[name]).is_relative_to(site), (name, files[name])
    assert {"small", "dense"} <= set(files["configs"])
