"""One training step: loss, backward through the engine, dense and sparse updates.

Kept apart from the loop so that every way of running a step (one process, Ray
workers) is the same code, and parity tests can call it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_fn(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())


def train_step(engine, tables, micro_batches, device: torch.device, *, hint=None,
               next_inputs: torch.Tensor | None = None) -> float:  # fmt: skip
    """One optimizer step over ``micro_batches``; returns their mean loss (this worker's).

    ``hint(inputs_BT)``, when given, is called after each micro-batch with the inputs of
    the one that follows (``next_inputs`` after the last: the next step's first), once
    the parameters that micro-batch will see are in place, so the rows it will read
    can be prefetched while this worker goes on.

    DeepSpeed scales each micro-batch loss by 1/grad_accum before backward, so the
    sparse row gradients the tables collect are averaged the same way as the dense ones.
    With several data-parallel workers DeepSpeed averages dense gradients over them;
    shard servers sum every worker's row gradients, so the step scales them by
    1/workers: the update is the one a single process would make on the global batch.
    """
    grad_scale = 1.0 / engine.dp_world_size
    loss_sum = 0.0
    for i, (inputs_BT, targets_BT) in enumerate(micro_batches):
        loss = loss_fn(engine(inputs_BT.to(device)), targets_BT.to(device))
        boundary = engine.is_gradient_accumulation_boundary()
        for table in tables if boundary else ():  # remote tables send it behind the backward
            table.expect_step(grad_scale)
        engine.backward(loss)
        stepping = []
        if boundary:  # remote tables' steps overlap the dense one
            stepping = [table.step_async(grad_scale) for table in tables]
        engine.step()
        for pending in stepping:  # the step is done (or has failed) before the next
            pending.wait()
        loss_sum += float(loss.detach())
        following = micro_batches[i + 1][0] if i + 1 < len(micro_batches) else next_inputs
        if hint is not None and following is not None:
            hint(following.to(device))
    return loss_sum / len(micro_batches)
