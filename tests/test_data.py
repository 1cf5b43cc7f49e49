"""Built-in corpus, byte tokenizer, Parquet round trip and the streaming loader."""

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memdist.config import MAX_ATTRIBUTES, load_config
from memdist.data.corpus import (
    ALL_ATTRIBUTES,
    ATTRIBUTES,
    FIRST_NAMES,
    LAST_NAMES,
    chance_baseline,
    generate_corpus,
    value_list,
)
from memdist.data.loader import TextStream
from memdist.data.parquet import read_qa, write_corpus
from memdist.data.prepare import builtin_dir
from memdist.data.tokenizer import ByteTokenizer
from memdist.errors import ConfigError, DataError


def test_generator_is_deterministic_and_names_unique():
    a, b = generate_corpus(50, seed=3), generate_corpus(50, seed=3)
    assert a.train_docs == b.train_docs and a.qa_eval == b.qa_eval
    assert generate_corpus(50, seed=4).train_docs != a.train_docs
    names = [p.name for p in a.people]
    assert len(set(names)) == 50


def test_held_out_questions_are_answerable_only_from_biographies():
    corpus = generate_corpus(40, n_bio_variants=2, qa_train_fraction=0.5, seed=0)
    text = "\n".join(corpus.train_docs)
    held_out = {q.person for q in corpus.qa_eval}
    assert held_out.isdisjoint(corpus.qa_train_people)
    assert len(held_out) == 20 and len(corpus.qa_eval) == 20 * len(ATTRIBUTES)
    for q in corpus.qa_eval:
        assert q.prompt not in text  # the QA form of held-out people is never trained on
        bios = [d for d in corpus.train_docs if q.person in d and not d.startswith("Q:")]
        assert len(bios) == 2 and all(q.answer in d for d in bios)
    for name in corpus.qa_train_people:
        assert f"Q: Where was {name} born?\nA:" in text


def test_documents_have_the_promised_shape():
    corpus = generate_corpus(30, n_bio_variants=3, seed=2)
    bios = [d for d in corpus.train_docs if not d.startswith("Q:")]
    qa_docs = [d for d in corpus.train_docs if d.startswith("Q:")]
    assert len(bios) == 30 * 3 and len(qa_docs) == len(corpus.qa_train_people) == 15
    assert all(100 <= len(d.encode()) <= 300 for d in bios)
    for doc in qa_docs:  # one document per person, one Q/A pair per attribute
        lines = doc.splitlines()
        assert doc.endswith("\n") and len(lines) == 2 * len(ATTRIBUTES)
        assert all(q.startswith("Q: ") for q in lines[0::2])
        assert all(a.startswith("A: ") for a in lines[1::2])
    # The renderings of one person differ (templates and sentence order vary).
    for person in corpus.people[:5]:
        assert len({d for d in bios if person.name in d}) > 1
    # Every cloze prompt is a prefix that the person's biography continues with the value.
    text = "\n".join(bios)
    for c in corpus.cloze_eval:
        assert c.person in c.prompt and not c.prompt.endswith(" ")
        assert f"{c.prompt} {c.answer}." in text
    assert {(c.person, c.attribute) for c in corpus.cloze_eval} == {
        (q.person, q.attribute) for q in corpus.qa_eval
    }


def test_chance_baseline_is_the_majority_guess():
    corpus = generate_corpus(200, seed=0)
    chance = chance_baseline(corpus)
    assert 0.0 < chance < 0.3
    # Answering every question right would score 1; a constant wrong guess scores 0.
    assert chance == pytest.approx(
        sum(1 for q in corpus.qa_eval if q.answer == _majority(corpus, q.attribute))
        / len(corpus.qa_eval)
    )


def _majority(corpus, attribute):
    trained = set(corpus.qa_train_people)
    values = [p.facts[attribute] for p in corpus.people if p.name in trained]
    return max(sorted(set(values)), key=values.count)


def test_bad_corpus_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="data.n_people=100000 exceeds"):
        generate_corpus(100_000)
    with pytest.raises(ConfigError, match="data.n_people=1 must be >= 2"):
        generate_corpus(1)
    with pytest.raises(ConfigError, match="data.n_bio_variants=0 must be >= 1"):
        generate_corpus(10, n_bio_variants=0)
    with pytest.raises(ConfigError, match=r"data.qa_train_fraction=1.0 must be in \(0, 1\)"):
        generate_corpus(10, qa_train_fraction=1.0)


def _digest(corpus) -> str:
    pairs = [[(q.prompt, q.answer) for q in qs] for qs in (corpus.qa_eval, corpus.cloze_eval)]
    return hashlib.sha256(json.dumps([corpus.train_docs, *pairs]).encode()).hexdigest()


def test_default_corpus_is_unchanged_by_the_scaling_knobs(tmp_path):
    """The knobs' defaults render the corpus of before they existed, byte for byte, under
    the same cache folder name and summary."""
    corpus = generate_corpus(100)
    assert _digest(corpus) == "6c0a8b8d306a8d6e6641dc975a0925e5f443b0d0c39c3036dbeb296df05321a0"
    assert _digest(generate_corpus(100, n_attributes=5, values_per_attribute=None)) == (
        _digest(corpus)
    )
    assert set(corpus.summary()) == {
        "format", "n_people", "n_bio_variants", "qa_train_fraction", "seed", "people",
        "train_docs", "train_bytes", "qa_eval", "cloze_eval", "qa_train_people",
    }  # fmt: skip
    cfg = load_config("small", [f"data.cache_dir={tmp_path}"])
    assert builtin_dir(cfg).name == "facts-p100-v3-q0.5-s0"
    wide = load_config("small", [f"data.cache_dir={tmp_path}", "data.n_attributes=8",
                                 "data.values_per_attribute=64"])  # fmt: skip
    assert builtin_dir(wide).name == "facts-p100-v3-q0.5-s0-a8-w64"


def test_more_attributes_and_wider_value_lists():
    corpus = generate_corpus(60, n_attributes=8, values_per_attribute=50, seed=1)
    assert [a.name for a in corpus.attributes] == [a.name for a in ALL_ATTRIBUTES[:8]]
    assert len(corpus.qa_eval) == 30 * 8 and len(corpus.cloze_eval) == 30 * 8
    for person in corpus.people:
        assert len(person.facts) == 8
    for a, builtin in zip(corpus.attributes, ALL_ATTRIBUTES, strict=False):
        assert len(a.values) == len(set(a.values)) == 50
        assert a.values[: len(builtin.values)] == builtin.values  # built-in words first
    # Every fact is in each of the person's biographies, ending a sentence.
    bios = [d for d in corpus.train_docs if not d.startswith("Q:")]
    for q in corpus.cloze_eval:
        assert f"{q.prompt} {q.answer}." in "\n".join(bios)
    # Invented words are the same in every corpus, and capitalised like the built-in ones.
    city = ALL_ATTRIBUTES[0]
    assert value_list(city, 40) == value_list(city, 60)[:40]
    assert all(v[0].isupper() for v in value_list(city, 60))
    assert value_list(city, 3) == city.values[:3]  # narrower lists keep their first words
    # Wider lists lower chance: the majority guess is right less often.
    assert chance_baseline(generate_corpus(400, values_per_attribute=100)) < 0.05
    assert len(ALL_ATTRIBUTES) == MAX_ATTRIBUTES


def test_new_people_can_join_without_a_name_clash():
    old = generate_corpus(50, seed=0)
    names = frozenset(p.name for p in old.people)
    new = generate_corpus(30, seed=1, exclude_names=names)
    assert names.isdisjoint(p.name for p in new.people)
    assert new.summary()["excluded_names"] == 50
    left = len(FIRST_NAMES) * len(LAST_NAMES) - 50
    with pytest.raises(ConfigError, match=rf"n_people={left + 1} exceeds the {left} .*\(50 excl"):
        generate_corpus(left + 1, exclude_names=names)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_attributes": 0}, "data.n_attributes=0 must be between 1 and 10"),
        ({"n_attributes": 11}, "data.n_attributes=11 must be between 1 and 10"),
        ({"values_per_attribute": 1}, "data.values_per_attribute=1 must be between 2 and 2000"),
        ({"values_per_attribute": 5000}, "data.values_per_attribute=5000 must be between 2"),
    ],
)
def test_scaling_knobs_are_checked_in_the_config_and_the_generator(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate_corpus(10, **kwargs)
    overrides = [f"data.{k}={v}" for k, v in kwargs.items()]
    with pytest.raises(ConfigError, match=message):
        load_config("small", overrides)


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Zoë was born in Köln — 東京\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids[1:-1]) < 256
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids[1:-1]
    assert tok.vocab_size == 259


def test_write_corpus_round_trip_and_reuse(tmp_path):
    corpus = generate_corpus(30, seed=1)
    paths = write_corpus(corpus, tmp_path)
    assert pq.read_table(paths["train"]).num_rows == len(corpus.train_docs)
    assert read_qa(paths["qa_eval"]) == corpus.qa_eval
    stamp = paths["train"].stat().st_mtime_ns
    write_corpus(corpus, tmp_path)
    assert paths["train"].stat().st_mtime_ns == stamp  # a complete set is reused
    write_corpus(generate_corpus(31, seed=1), tmp_path)
    assert pq.read_table(paths["train"]).num_rows != len(corpus.train_docs)
    # The same arguments give byte-identical files in a fresh folder.
    first = write_corpus(corpus, tmp_path / "a")
    second = write_corpus(generate_corpus(30, seed=1), tmp_path / "b")
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes()


def test_writers_racing_for_one_cold_cache_all_succeed(tmp_path):
    """Data-parallel workers that find no cached corpus all write it at once."""
    corpus = generate_corpus(30, seed=1)
    barrier = threading.Barrier(4)

    def write(_):
        barrier.wait()  # start together, so the renames collide if names are shared
        return write_corpus(corpus, tmp_path)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(write, range(4)))
    assert all(r == results[0] for r in results)
    assert read_qa(results[0]["qa_eval"]) == corpus.qa_eval
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in results[0].values())


def write_texts(path, texts, column="text"):
    pq.write_table(pa.table({column: texts}), path)
    return path


def test_stream_packs_shifted_windows(tmp_path):
    texts = [f"document number {i} " * (i % 5 + 1) for i in range(40)]
    path = write_texts(tmp_path / "d.parquet", texts)
    stream = iter(TextStream(path, seq_len=16, batch_size=3, seed=0))
    first = [next(stream) for _ in range(5)]
    for x, y in first:
        assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
    again = iter(TextStream(path, seq_len=16, batch_size=3, seed=0))
    for (x, _), (x2, _) in zip(first, (next(again) for _ in range(5)), strict=True):
        assert torch.equal(x, x2)
    other = next(iter(TextStream(path, seq_len=16, batch_size=3, seed=1)))[0]
    assert not torch.equal(other, first[0][0])
    # With a one-document buffer the order is kept: windows are the EOS-joined documents.
    tok = ByteTokenizer()
    joined = [t for text in texts for t in tok.encode(text, eos=True)]
    x, y = next(iter(TextStream(path, seq_len=16, batch_size=3, seed=0, shuffle_buffer=1)))
    rows = torch.cat([x, y[:, -1:]], dim=1).reshape(-1).tolist()
    assert rows == joined[: 3 * 17]


def test_stream_runs_past_one_epoch_and_reshuffles(tmp_path):
    texts = [f"d{i:02d}" for i in range(20)]  # 4 tokens each with EOS: one epoch is 80 tokens
    path = write_texts(tmp_path / "d.parquet", texts)
    stream = iter(TextStream(path, seq_len=79, batch_size=1, seed=0, shuffle_buffer=8))
    tok = ByteTokenizer()
    epochs = []
    for _ in range(3):  # windows align with epochs here: each holds every document once
        x, y = next(stream)
        ids = torch.cat([x, y[:, -1:]], dim=1)[0].tolist()
        epochs.append(tok.decode(t if t != tok.eos_id else ord(" ") for t in ids).split())
        assert sorted(epochs[-1]) == texts
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("n_files", [1, 4])
def test_rank_sharding_is_disjoint_and_covering(tmp_path, n_files):
    texts = [f"doc-{i:03d};" for i in range(30)]
    for k in range(n_files):
        write_texts(tmp_path / f"{k}.parquet", texts[k::n_files])
    for epoch in range(3):  # the file order changes per epoch; the shares must stay disjoint
        seen = []
        for rank in range(3):
            stream = TextStream(tmp_path, seq_len=7, batch_size=1, seed=0, rank=rank, world_size=3)
            seen.append(list(stream.docs(epoch)))
        assert sum(len(s) for s in seen) == 30
        assert sorted(seen[0] + seen[1] + seen[2]) == sorted(texts)


def test_user_parquet_with_custom_column_directory_and_glob(tmp_path):
    (tmp_path / "shards").mkdir()
    write_texts(tmp_path / "shards" / "a.parquet", ["alpha " * 20], column="body")
    write_texts(tmp_path / "shards" / "b.parquet", ["beta " * 20], column="body")
    for source in (tmp_path / "shards", str(tmp_path / "shards" / "*.parquet")):
        stream = TextStream(source, text_column="body", seq_len=8, batch_size=2)
        assert len(stream.files) == 2
        x, _ = next(iter(stream))
        assert x.shape == (2, 8)


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.parquet' does not exist"):
        TextStream(tmp_path / "missing.parquet", seq_len=4, batch_size=1)
    with pytest.raises(DataError, match=f"{tmp_path.name}' is a directory with no \\*.parquet"):
        TextStream(tmp_path, seq_len=4, batch_size=1)
    with pytest.raises(DataError, match="matches no files"):
        TextStream(str(tmp_path / "*.parquet"), seq_len=4, batch_size=1)
    path = write_texts(tmp_path / "d.parquet", ["x"], column="body")
    with pytest.raises(DataError, match=r"column 'text' is not in .*columns are \['body'\]"):
        TextStream(path, seq_len=4, batch_size=1)
    empty = write_texts(tmp_path / "e.parquet", [""])
    with pytest.raises(DataError, match="no text for rank 0"):
        next(iter(TextStream(empty, seq_len=4, batch_size=1)))
    short = write_texts(tmp_path / "s.parquet", ["tiny"])
    with pytest.raises(DataError, match=r"has 5 tokens per epoch .* fewer than one batch .* = 9"):
        next(iter(TextStream(short, seq_len=8, batch_size=1)))
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(DataError, match="column 'text' of .* has type int64; it must hold strings"):
        TextStream(numbers, seq_len=4, batch_size=1)
    with pytest.raises(ConfigError, match="rank=2 must be in"):
        TextStream(short, seq_len=4, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="shuffle_buffer=0 must be >= 1"):
        TextStream(short, seq_len=4, batch_size=1, shuffle_buffer=0)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        TextStream(bad, seq_len=4, batch_size=1)
    with pytest.raises(DataError, match="lacks column"):
        read_qa(path)
