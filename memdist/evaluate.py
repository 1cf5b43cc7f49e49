"""Evaluation: held-out perplexity, QA exact match and F1, and memory key usage.

Metrics come from torchmetrics (``Perplexity`` and ``SQuAD``'s exact match / F1),
so a data-parallel run synchronises them: with ``world`` > 1 every worker scores
its own slice (``rank::world``) and ``compute()`` sums the slices' states over
torch.distributed; key-usage counts are summed the same way. QA answers are
greedy-decoded from the prompt until a newline; prompts of equal length are
decoded together so no padding or attention mask is needed. Decoding re-runs the
whole sequence each step (no KV cache), so it tells the memory layers to count only
the reads of positions not counted yet: each position's reads once, as one forward
over the final sequences would count them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.text import Perplexity, SQuAD

from memdist.data.tokenizer import ByteTokenizer
from memdist.memory import MemoryLayer, key_usage
from memdist.model import Transformer

IGNORE = -100
NEWLINE = ord("\n")


@torch.no_grad()
def greedy_answers(
    model: Transformer, prompts: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuation of each prompt up to the first newline (or EOS).

    Memory layers counting key usage count each position once: a position's reads
    depend only on its prefix, so after a group's first forward only the newest
    position is counted."""
    tok = ByteTokenizer()
    device = next(model.parameters()).device
    layers = model.memory_layers()
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [tok.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    answers = [""] * len(prompts)
    limit = model.cfg.max_seq_len
    try:
        for _, members in sorted(by_len.items()):
            for start in range(0, len(members), batch_size):
                group = members[start : start + batch_size]
                answers_of_group = _greedy_group(
                    model, layers, [encoded[i] for i in group], max_new_tokens, limit, device
                )
                for i, answer in zip(group, answers_of_group, strict=True):
                    answers[i] = answer
    finally:
        for layer in layers:
            layer.usage_from_t = 0
    return answers


def _greedy_group(
    model: Transformer,
    layers: Sequence[MemoryLayer],
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    limit: int,
    device: torch.device,
) -> list[str]:
    """Greedy answers of prompts of equal length, decoded as one batch."""
    tok = ByteTokenizer()
    seq_BT = torch.tensor(prompts, dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if seq_BT.shape[1] >= limit:
            break
        # The first forward counts the prompt; later ones only the token just appended.
        for layer in layers:
            layer.usage_from_t = 0 if step == 0 else seq_BT.shape[1] - 1
        next_B = model(seq_BT)[:, -1].argmax(-1)
        for j, t in enumerate(next_B.tolist()):
            if not done[j]:
                out[j].append(t)
        done |= (next_B == NEWLINE) | (next_B == tok.eos_id)
        if bool(done.all()):
            break
        seq_BT = torch.cat([seq_BT, next_B[:, None]], dim=1)
    return [tok.decode(o).split("\n")[0].strip() for o in out]


@torch.no_grad()
def perplexity(model: Transformer, texts: Sequence[str], batch_size: int) -> tuple[float, float]:
    """Perplexity and mean loss (nats/token) of ``texts``, each scored as one sequence
    (over every worker's texts when torch.distributed is initialised)."""
    tok = ByteTokenizer()
    device = next(model.parameters()).device
    metric = Perplexity(ignore_index=IGNORE).to(device)
    limit = model.cfg.max_seq_len + 1
    seqs = [tok.encode(t, bos=True, eos=True)[:limit] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
        tgt = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            tgt[j, : len(s)] = torch.tensor(s)
        logits = model(ids[:, :-1].to(device)).float()
        metric.update(logits, tgt[:, 1:].to(device))
    ppl = float(metric.compute())  # a collective when distributed: every worker calls it
    if ppl != ppl:  # no tokens anywhere
        return float("nan"), float("nan")
    return ppl, float(torch.log(torch.tensor(ppl)))


def qa_scores(
    predictions: Sequence[str], answers: Sequence[str], device: torch.device | None = None
) -> dict[str, float]:
    """Exact match and token F1 in [0, 1], with SQuAD's answer normalisation (over every
    worker's answers when torch.distributed is initialised). The metric's sums live on
    ``device``, the model's: an NCCL group (GPU workers) reduces no CPU tensor."""
    metric = SQuAD().to(device or "cpu")
    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target: list[dict[str, Any]] = [
        {"answers": {"answer_start": [0], "text": [a]}, "id": str(i)} for i, a in enumerate(answers)
    ]
    if preds:
        metric.update(preds, target)
    out = metric.compute()  # a collective when distributed: every worker calls it
    em, f1 = float(out["exact_match"]), float(out["f1"])
    if em != em:  # no answers anywhere
        return {"qa_em": 0.0, "qa_f1": 0.0}
    return {"qa_em": em / 100, "qa_f1": f1 / 100}


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` summed over the ``world`` data-parallel workers (every worker calls it)."""
    if world == 1:
        return t
    import torch.distributed as dist

    on = torch.device("cuda") if dist.get_backend() == "nccl" else t.device
    total = t.to(on)
    dist.all_reduce(total)
    return total.to(t.device)


def evaluate(
    model: Transformer,
    qa: Sequence[Any],
    ppl_texts: Sequence[str],
    *,
    max_qa: int,
    max_new_tokens: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """All eval metrics of ``model`` on held-out QA pairs (objects with prompt/answer).

    With ``world`` > 1 this worker scores its slice and the results cover all slices;
    every worker must call it (the metrics synchronise)."""
    was_training = model.training
    model.eval()
    layers = model.memory_layers()
    for layer in layers:
        layer.usage_V = torch.zeros(layer.table.num_rows, dtype=torch.long)
    try:
        ppl, eval_loss = perplexity(model, list(ppl_texts)[rank::world], batch_size)
        all_qa = list(qa)[:max_qa]
        qa = all_qa[rank::world]
        preds = greedy_answers(model, [q.prompt for q in qa], max_new_tokens, batch_size)
        result: dict[str, Any] = {"eval_loss": eval_loss, "ppl": ppl}
        device = next(model.parameters()).device
        result.update(qa_scores(preds, [q.answer for q in qa], device))
        result["qa_n"] = len(all_qa)
        result["qa_examples"] = [
            {"prompt": q.prompt, "answer": q.answer, "prediction": p}
            for q, p in list(zip(qa, preds, strict=True))[:3]
        ]
        if layers:
            stats = [
                key_usage(all_sum(layer.usage_V, world))
                for layer in layers
                if layer.usage_V is not None
            ]
            result["key_usage"] = sum(s["key_usage"] for s in stats) / len(stats)
            result["key_kl"] = sum(s["key_kl"] for s in stats) / len(stats)
            result["key_usage_per_layer"] = [round(s["key_usage"], 4) for s in stats]
    finally:
        for layer in layers:
            layer.usage_V = None
        model.train(was_training)
    return result
