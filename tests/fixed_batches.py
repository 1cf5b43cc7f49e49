"""Training batches shared by the parity tests (not a test module)."""

import torch


def batches(cfg, n, seed=1):
    """``n`` (inputs, targets) batches of ``cfg``'s shape drawn from 8 fixed sequences,
    so a few steps visibly lower the loss and every run of the same seed sees the same data."""
    g = torch.Generator().manual_seed(seed)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    patterns = torch.randint(0, 256, (8, t + 1), generator=g)
    data = patterns[torch.randint(0, 8, (n, b), generator=g)]
    return [(d[:, :-1], d[:, 1:]) for d in data]
