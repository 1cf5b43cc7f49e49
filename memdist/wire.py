"""What travels between workers and shards: de-duplicated indices.

A bag of N x K indices usually repeats rows (popular keys, several heads reading
the same row). ``PackedIndices`` sends each distinct row once as int64 and one
int32 position per entry, instead of N x K int64 indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PackedIndices:
    rows_U: torch.Tensor  # distinct rows, sorted, int64
    inverse_NK: torch.Tensor  # position of each entry's row in rows_U, int32

    @classmethod
    def pack(cls, idx_NK: torch.Tensor) -> PackedIndices:
        rows_U, inverse = torch.unique(idx_NK, sorted=True, return_inverse=True)
        return cls(rows_U.long(), inverse.to(torch.int32))

    def unpack(self) -> torch.Tensor:
        return self.rows_U[self.inverse_NK.long()]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows_U, self.inverse_NK))


def unpack(idx: torch.Tensor | PackedIndices) -> torch.Tensor:
    return idx.unpack() if isinstance(idx, PackedIndices) else idx
