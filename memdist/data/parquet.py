"""Writing the built-in corpus to Parquet and reading QA files back, with pyarrow.

Files are written under temporary names and renamed, and a ``corpus.json`` summary
written last marks a complete set: a second call with the same corpus reuses it.
Several processes may write the same set at once (each under its own temporary names).
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memdist.data.corpus import FactCorpus, QAPair
from memdist.errors import DataError

QA_COLUMNS = ("prompt", "answer", "person", "attribute")


def _temp_name(path: Path) -> Path:
    """A temporary name of this writer's own: data-parallel workers that find no cached
    corpus all write it at once (the same bytes), and each renames its own file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def _write_table(table: pa.Table, path: Path) -> None:
    tmp = _temp_name(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _qa_table(pairs: list[QAPair]) -> pa.Table:
    return pa.table({c: [getattr(p, c) for p in pairs] for c in QA_COLUMNS})


def write_corpus(corpus: FactCorpus, directory: Path | str) -> dict[str, Path]:
    """Write train/qa_eval/cloze_eval Parquet files and the summary; reuse a complete set."""
    directory = Path(directory)
    paths = {
        "train": directory / "train.parquet",
        "qa_eval": directory / "qa_eval.parquet",
        "cloze_eval": directory / "cloze_eval.parquet",
        "summary": directory / "corpus.json",
    }
    summary = corpus.summary()
    if paths["summary"].is_file() and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(paths["summary"].read_text()) == summary:
                return paths
        except json.JSONDecodeError:
            pass  # a damaged summary: rewrite everything below
    directory.mkdir(parents=True, exist_ok=True)
    docs = list(corpus.train_docs)
    random.Random(corpus.params.get("seed", 0)).shuffle(docs)
    _write_table(pa.table({"text": docs}), paths["train"])
    _write_table(_qa_table(corpus.qa_eval), paths["qa_eval"])
    _write_table(_qa_table(corpus.cloze_eval), paths["cloze_eval"])
    tmp = _temp_name(paths["summary"])
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, paths["summary"])
    return paths


def read_qa(path: Path | str) -> list[QAPair]:
    """QA pairs from a Parquet file with ``prompt`` and ``answer`` columns (others optional)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"QA file {str(path)!r} does not exist")
    table = pq.read_table(path)
    missing = [c for c in ("prompt", "answer") if c not in table.column_names]
    if missing:
        raise DataError(
            f"QA file {str(path)!r} lacks column(s) {missing}; it has {table.column_names}"
        )
    blank = [""] * table.num_rows
    cols = {
        c: [str(v) for v in table.column(c).to_pylist()] if c in table.column_names else blank
        for c in QA_COLUMNS
    }
    return [QAPair(*row) for row in zip(*(cols[c] for c in QA_COLUMNS), strict=True)]
