"""Built-in data: synthetic factual corpus, byte tokenizer, Parquet streaming."""

from memdist.data.corpus import FactCorpus, Person, QAPair, chance_baseline, generate_corpus
from memdist.data.loader import TextStream, find_parquet_files
from memdist.data.parquet import read_qa, write_corpus
from memdist.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "FactCorpus",
    "Person",
    "QAPair",
    "TextStream",
    "chance_baseline",
    "find_parquet_files",
    "generate_corpus",
    "read_qa",
    "write_corpus",
]
