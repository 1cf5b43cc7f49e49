"""Training on a CUDA GPU against the single-process CPU torch loop, on the same seed.

On CUDA the backbone runs in a DeepSpeed engine (NCCL process group), the memory
layer's lookup, backward and sparse update in the compiled Triton kernels, and shard
servers hold their rows on the GPU when ``shards.gpus_per_shard`` > 0. Each path is
compared over 20 steps with the torch loop on CPU (``backend=torch``), fp32, where
only roundoff differs (the GPU's matrix products and its approximate divisions in
Adam). Skipped without a GPU: CI has none; `benchmarks/gpu_train.sh` runs it on one.
"""

import math

import pytest
import torch
from fixed_batches import batches

from memdist.assembly import build_model, make_engine, make_optimizer, resolve_runtime
from memdist.assembly import unique_tables as unique
from memdist.config import load_config
from memdist.shards import start_remote_tables
from memdist.step import loss_fn, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 20
CUDA = torch.device("cuda")


def cfg_for(device, *extra):
    """A debug-sized Memory+ model; the Adams' eps well above roundoff (as in
    test_engine_parity.py), so 20 steps keep the runs within the tolerances below."""
    return load_config(
        "small",
        [
            "shards.count=0",
            "model.dim=64",
            "model.n_heads=2",
            "model.n_layers=2",
            "model.memory.layers=[1]",
            "model.memory.n_keys=32",
            "model.memory.knn=8",
            "model.memory.k_dim=32",
            "model.memory.value_eps=1e-4",
            "optim.eps=1e-6",
            "optim.warmup_steps=2",
            "data.batch_size=8",
            "data.seq_len=32",
            f"train.device={device}",
            "train.precision=fp32",
            f"train.steps={STEPS}",
            *extra,
        ],
    )


def cpu_reference(data):
    """The torch loop on CPU: AdamW + schedule + clipping, the table steps after."""
    cfg = cfg_for("cpu", "model.memory.backend=torch")
    model, tables = build_model(cfg, torch.device("cpu"))
    optimizer, scheduler = make_optimizer(cfg, model)
    losses = []
    for inputs, targets in data:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        for t in unique(tables):
            t.step()
        losses.append(float(loss.detach()))
    return losses, weights(tables, cfg)


def weights(tables, cfg):
    """The (one) table's values, as a CPU tensor."""
    return unique(tables)[0].read_rows(0, cfg.model.memory.rows)["weight"]


def cuda_run(cfg, data, tables=None):
    model, built = build_model(cfg, CUDA, tables)
    engine = make_engine(cfg, model, resolve_runtime(cfg))
    losses = [train_step(engine, unique(built), [batch], CUDA) for batch in data]
    return losses, weights(built, cfg)


@pytest.fixture(scope="module")
def reference():
    data = batches(cfg_for("cpu"), STEPS)
    return data, *cpu_reference(data)


def assert_matches(got, reference):
    _, ref_losses, ref_values = reference
    losses, values = got
    assert ref_losses[-1] < 0.8 * ref_losses[0]  # it trains at all
    assert all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    torch.testing.assert_close(values, ref_values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [0, 2])
def test_cuda_engine_and_triton_kernels_match_the_cpu_torch_loop(reference, stage):
    cfg = cfg_for("cuda", f"train.zero_stage={stage}")
    assert resolve_runtime(cfg).device.type == "cuda"
    assert_matches(cuda_run(cfg, reference[0]), reference)


@pytest.mark.parametrize("gpus_per_shard", [0, 1])
@pytest.mark.parametrize("plan", ["row", "column"])
def test_cuda_worker_with_shards_matches_the_cpu_torch_loop(reference, plan, gpus_per_shard):
    """A GPU worker over two shard servers holding their rows in host memory (the CPU
    parameter server) or on the GPU: scores and gradients cross devices each step."""
    cfg = cfg_for(
        "cuda", "shards.count=2", f"shards.plan={plan}", "shards.transport=inprocess",
        f"shards.gpus_per_shard={gpus_per_shard}",
    )  # fmt: skip
    tables, group = start_remote_tables(cfg)
    try:
        shard_devices = {s["device"] for s in tables[0].stats()}
        assert shard_devices == {"cuda" if gpus_per_shard else "cpu"}
        assert_matches(cuda_run(cfg, reference[0], tables), reference)
    finally:
        group.stop()


def test_bf16_training_on_cuda_lowers_the_loss():
    """The default precision on a GPU (bf16 backbone and table): no exact reference, but
    finite losses that fall as the fp32 run's do."""
    cfg = cfg_for("cuda", "train.precision=bf16")
    assert resolve_runtime(cfg).dtype == torch.bfloat16
    losses, values = cuda_run(cfg, batches(cfg, STEPS))
    assert all(math.isfinite(x) for x in losses) and torch.isfinite(values).all()
    assert losses[-1] < 0.8 * losses[0]
