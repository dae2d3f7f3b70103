"""Token shards on the reading side (training/data.py TokenShards), without Ray: rows read by offset equal
the array that was written, however they are indexed, read ahead, or spread over shards and dtypes; a
folder in the old parquet format is refused with a message that says what to do."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.core import lineage, storage
from raylm.core.artifacts import CURATED, CuratedDir
from raylm.core.errors import InputError
from raylm.pipelines.write import write_token_split
from raylm.training.data import TokenShards
from raylm.training.run import read_curated


def curated_with(tmp_path, rows: np.ndarray, rows_per_shard: int, vocab_size: int | None) -> CuratedDir:
    curated = CuratedDir(str(tmp_path / "curated"))
    write_token_split(curated.shards, "train", rows, rows_per_shard, vocab_size=vocab_size)
    return curated


@pytest.mark.parametrize(("vocab", "dtype", "itemsize"), [(50_000, "uint16", 2), (70_000, "uint32", 4)])
def test_rows_read_by_offset_equal_the_written_array(tmp_path, vocab, dtype, itemsize):
    rows = np.random.default_rng(0).integers(0, vocab, size=(103, 16), dtype=np.int64)
    curated = curated_with(tmp_path, rows, rows_per_shard=25, vocab_size=vocab)
    index = storage.read_json(curated.shard_index_path("train"))
    # 103 rows in shards of at most 25: 5 shards, balanced to within one row, named in order
    assert [s["rows"] for s in index["shards"]] == [21, 21, 21, 20, 20]
    assert [s["file"] for s in index["shards"]] == [CuratedDir.shard_name("train", i) for i in range(5)]
    assert {s["dtype"] for s in index["shards"]} == {dtype} and index["seq_len"] == 16
    first = curated.shard_files("train")[0]
    assert os.path.getsize(first) == 21 * 16 * itemsize  # raw ids, nothing else
    assert np.array_equal(np.fromfile(first, f"<u{itemsize}").reshape(21, 16), rows[:21])

    shards = TokenShards.open(curated.root, "train")
    assert len(shards) == 103 and shards.shape == (103, 16)
    picks = np.array([102, 0, 20, 21, 22, 62, 63, 5, 5, 41])  # shard edges, repeats, any order
    out = shards[picks]
    assert out.dtype == np.int32 and np.array_equal(out, rows[picks])
    assert np.array_equal(shards[:], rows) and np.array_equal(shards[19:44], rows[19:44])
    assert np.array_equal(shards[:1, :4], rows[:1, :4]) and np.array_equal(shards[-1], rows[-1])
    with pytest.raises(IndexError):
        shards[np.array([103])]
    shards.close()


def test_prefetched_rows_are_the_rows_asked_for_and_remote_reads_agree(tmp_path):
    rows = np.random.default_rng(1).integers(0, 500, size=(64, 8))
    shards = TokenShards.open(curated_with(tmp_path, rows, 10, 500).root, "train")
    order = np.random.default_rng(2).permutation(64)
    shards.prefetch(order[:16])
    assert np.array_equal(shards[order[16:20]], rows[order[16:20]])  # not read ahead: read now
    assert shards._pending is not None  # ...and the read-ahead is kept for its step
    assert np.array_equal(shards[order[:16]], rows[order[:16]]) and shards._pending is None
    shards._remote = True  # the object-store path: concurrent ranged reads (on local files here)
    assert np.array_equal(shards[order], rows[order])
    shards.close()


def test_mixed_dtypes_and_a_truncated_shard(tmp_path):
    """Without a vocabulary each shard takes the narrowest dtype of its own ids; a shard whose size
    disagrees with its index is an error naming it, never rows read from the wrong place."""
    rows = np.arange(40 * 4).reshape(40, 4) * 700  # ids up to 111,300: the later shards need uint32
    curated = curated_with(tmp_path, rows, 10, vocab_size=None)
    index = storage.read_json(curated.shard_index_path("train"))
    assert [s["dtype"] for s in index["shards"]] == ["uint16", "uint16", "uint32", "uint32"]
    shards = TokenShards.open(curated.root, "train")
    assert np.array_equal(shards[np.arange(40)[::-1]], rows[::-1])
    last = curated.shard_files("train")[-1]
    with open(last, "r+b") as f:
        f.truncate(8)
    with pytest.raises(ValueError, match=last.rsplit("/", 1)[-1]):
        TokenShards.open(curated.root, "train")[39]


def test_old_parquet_shards_are_refused_naming_the_folder(tmp_path):
    curated = CuratedDir(str(tmp_path / "old"))
    (tmp_path / "old" / "shards").mkdir(parents=True)
    table = pa.table({"input_ids": pa.array([[1, 2, 3, 4]] * 8, pa.list_(pa.int32()))})
    pq.write_table(table, f"{curated.shards}/train-00000.parquet")
    (tmp_path / "old" / "tokenizer").mkdir()
    lineage.write_manifest(curated.root, CURATED, {}, seq_len=4, vocab_size=10, counts={})
    for attempt in (lambda: read_curated(curated.root), lambda: TokenShards.open(curated.root, "train")):
        with pytest.raises(InputError, match="old parquet format") as err:
            attempt()
        assert curated.root in str(err.value) and "raylm curate" in str(err.value)
    assert TokenShards.open(str(tmp_path / "none"), "train") is None  # no shards at all: no split


def test_the_sampler_order_is_numpys_permutation_in_int32():
    """The epoch order kept in int32 (half the memory) is Generator.permutation's, row for row."""
    from raylm.training.data import GlobalSampler

    perm = GlobalSampler.permutation(7, 3, 1001)
    assert perm.dtype == np.int32
    assert np.array_equal(perm, np.random.default_rng([7, 3]).permutation(1001))
