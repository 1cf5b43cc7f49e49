"""``memdist.openmp``: the short OpenMP spin is in place before torch loads, in the command
line's process and in the Ray processes started after it; a value the user set stays."""

import os
import subprocess
import sys

import pytest

from memdist.openmp import SPIN_COUNT


def python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    return out.stdout.split()


def test_the_spin_is_set_before_torch_loads_and_a_users_value_stays():
    code = ("import os; from memdist.openmp import prefer_short_spin as p; first = p(); "
            "import torch; print(first, p(), os.environ['GOMP_SPINCOUNT'])")  # fmt: skip
    assert python(code) == ["True", "False", str(SPIN_COUNT)]
    assert python(code, GOMP_SPINCOUNT="123") == ["True", "False", "123"]


def test_the_command_line_sets_it_first_thing():
    code = ("import os, sys; from memdist.cli import main; main(['configs']); "
            "print(os.environ['GOMP_SPINCOUNT'])")  # fmt: skip
    assert python(code)[-1] == str(SPIN_COUNT)


@pytest.mark.usefixtures("ray_local")
def test_shard_actors_of_a_local_instance_inherit_it():
    import ray

    from memdist.cluster.actors import start_shards, stop_shards
    from memdist.cluster.plan import make_plan
    from memdist.kernels import OptimizerSpec

    actors = start_shards(make_plan("row", 64, 8, 2), OptimizerSpec("sgd", lr=0.1), seed=0)
    try:
        seen = ray.get([a.__ray_call__.remote(lambda self: os.environ.get("GOMP_SPINCOUNT"))
                        for a in actors])  # fmt: skip
    finally:
        stop_shards(actors)
    assert seen == [os.environ["GOMP_SPINCOUNT"]] * 2
