"""From a data config to a training stream and evaluation sets.

The built-in corpus is generated once per (size, split, seed) into a cache folder of
Parquet files and streamed from there, exactly as a user's own Parquet would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from memdist.config import RunConfig
from memdist.data.corpus import ATTRIBUTES, chance_baseline, generate_corpus
from memdist.data.loader import TextStream
from memdist.data.parquet import read_qa, write_corpus
from memdist.errors import DataError


@dataclass(slots=True)
class EvalSets:
    """Held-out QA pairs (objects with ``prompt`` and ``answer``) and texts for perplexity."""

    qa: list[Any]
    ppl_texts: list[str]
    chance_em: float | None = None


def builtin_dir(cfg: RunConfig) -> Path:
    d = cfg.data
    name = f"facts-p{d.n_people}-v{d.n_bio_variants}-q{d.qa_train_fraction:g}-s{d.seed}"
    # Knobs off their defaults name their own folder; the default keeps its old name.
    if d.n_attributes != len(ATTRIBUTES):
        name += f"-a{d.n_attributes}"
    if d.values_per_attribute is not None:
        name += f"-w{d.values_per_attribute}"
    return Path(d.cache_dir).expanduser() / name


def _first_texts(source: str, column: str, limit: int) -> list[str]:
    """Up to ``limit`` texts from the start of the user's Parquet source."""
    stream = TextStream(source, text_column=column, seq_len=2, batch_size=1, seed=0)
    out: list[str] = []
    for path in stream.files:
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=limit):
            out.extend(str(t) for t in batch.column(0).to_pylist() if t)
            if len(out) >= limit:
                return out[:limit]
    return out


def prepare_data(
    cfg: RunConfig, *, rank: int = 0, world_size: int = 1
) -> tuple[TextStream, EvalSets]:
    d = cfg.data
    common = dict(
        seq_len=d.seq_len,
        batch_size=d.batch_size,
        seed=d.seed,
        shuffle_buffer=d.shuffle_buffer,
        rank=rank,
        world_size=world_size,
    )
    n_ppl = cfg.eval.ppl_batches * cfg.eval.batch_size
    if d.source == "builtin":
        corpus = generate_corpus(
            n_people=d.n_people,
            n_bio_variants=d.n_bio_variants,
            qa_train_fraction=d.qa_train_fraction,
            seed=d.seed,
            n_attributes=d.n_attributes,
            values_per_attribute=d.values_per_attribute,
        )
        paths = write_corpus(corpus, builtin_dir(cfg))
        stream = TextStream(paths["train"], text_column="text", **common)
        qa = read_qa(paths["qa_eval"])
        # Held-out perplexity: the QA lines of people whose QA form was never trained on.
        ppl = [f"{q.prompt} {q.answer}\n" for q in qa][:n_ppl]
        return stream, EvalSets(qa=qa, ppl_texts=ppl, chance_em=chance_baseline(corpus))
    stream = TextStream(d.source, text_column=d.text_column, **common)
    qa = []
    if d.qa_eval is not None:
        if not Path(d.qa_eval).is_file():
            raise DataError(f"data.qa_eval={d.qa_eval!r} does not exist")
        qa = read_qa(Path(d.qa_eval))
    return stream, EvalSets(qa=qa, ppl_texts=_first_texts(d.source, d.text_column, n_ppl))
