"""Byte-level tokenizer: UTF-8 bytes are tokens 0..255, plus BOS, EOS and PAD.

Nothing is downloaded; any text round-trips.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes plus three special tokens (BOS=256, EOS=257, PAD=258)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_array(self, text: str) -> np.ndarray:
        """The bytes of ``text`` as int64 (fast path for streaming)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
