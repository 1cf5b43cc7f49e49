"""Streaming token batches from Parquet text files with pyarrow.

``TextStream`` reads record batches (never a whole file), takes this rank's share of
the documents, shuffles them through a bounded buffer, tokenises bytes with an EOS
after each document, and packs the stream into ``(inputs_BT, targets_BT)`` windows of
``seq_len + 1`` tokens. It repeats epochs forever (reshuffled each time); the
trainer decides how many steps to take.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from memdist.data.tokenizer import ByteTokenizer
from memdist.errors import ConfigError, DataError

READ_BATCH_ROWS = 512


def find_parquet_files(source: str | Path) -> list[Path]:
    """A file, a directory (its ``*.parquet``, recursively) or a glob pattern."""
    text = (
        str(Path(source).expanduser()) if not any(c in str(source) for c in "*?[") else str(source)
    )
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"data source {text!r} is a directory with no *.parquet files")
        return files
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data source pattern {text!r} matches no files")
        return files
    raise DataError(f"data source {text!r} does not exist")


class TextStream:
    """Infinite, deterministic stream of packed token batches from Parquet text.

    Document ``i`` of an epoch (counted over the files in that epoch's order, which
    every rank computes alike) belongs to rank ``i % world_size``: ranks see disjoint
    shares that together cover the data. Each rank then shuffles its share with its
    own generator, so ranks do not read their documents in lockstep.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        text_column: str = "text",
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer={shuffle_buffer} must be >= 1 (1 keeps file order)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        self.files = find_parquet_files(source)
        for path in self.files:
            try:
                schema = pq.ParquetFile(path).schema_arrow
            except Exception as exc:  # pyarrow raises several types for a bad file
                raise DataError(f"{str(path)!r} is not a readable Parquet file: {exc}") from exc
            if text_column not in schema.names:
                raise DataError(
                    f"column {text_column!r} is not in {str(path)!r}; its columns are {schema.names}"
                )
            kind = schema.field(text_column).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(
                    f"column {text_column!r} of {str(path)!r} has type {kind}; it must hold strings"
                )
        self.text_column = text_column
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.tokenizer = ByteTokenizer()

    def docs(self, epoch: int) -> Iterator[str]:
        """This rank's non-empty documents of one epoch, unshuffled, in that epoch's file order."""
        # The file order must not depend on the rank, or the ranks' shares would overlap.
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        index = 0
        for f in order:
            reader = pq.ParquetFile(self.files[f])
            for batch in reader.iter_batches(
                batch_size=READ_BATCH_ROWS, columns=[self.text_column]
            ):
                for text in batch.column(0).to_pylist():
                    if index % self.world_size == self.rank and text:
                        yield text
                    index += 1

    def _shuffled(self, docs: Iterator[str], rng: np.random.Generator) -> Iterator[str]:
        """Each document leaves a bounded buffer at a random slot: memory stays O(buffer)."""
        buffer: list[str] = []
        for doc in docs:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(doc)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], doc = doc, buffer[j]
            yield doc
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        window = self.batch_size * (self.seq_len + 1)
        eos = np.array([self.tokenizer.eos_id], dtype=np.int64)
        pending: list[np.ndarray] = []
        n_pending = 0
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            epoch_tokens = 0
            for doc in self._shuffled(self.docs(epoch), rng):
                ids = self.tokenizer.encode_array(doc)
                pending += [ids, eos]
                n_pending += ids.size + 1
                epoch_tokens += ids.size + 1
                while n_pending >= window:
                    flat = np.concatenate(pending)
                    chunk, rest = flat[:window], flat[window:]
                    pending, n_pending = [rest], rest.size
                    tokens_BT = torch.from_numpy(chunk).view(self.batch_size, self.seq_len + 1)
                    yield tokens_BT[:, :-1].contiguous(), tokens_BT[:, 1:].contiguous()
            where = f"{[str(f) for f in self.files]} (column {self.text_column!r})"
            if epoch_tokens == 0:
                raise DataError(f"no text for rank {self.rank} of {self.world_size} in {where}")
            if epoch == 0 and epoch_tokens < window:
                # Windows would only repeat the same few documents within one batch.
                raise DataError(
                    f"rank {self.rank} of {self.world_size} has {epoch_tokens} tokens per epoch "
                    f"in {where}, fewer than one batch of batch_size={self.batch_size} x "
                    f"(seq_len+1)={self.seq_len + 1} = {window} tokens"
                )
            epoch += 1
