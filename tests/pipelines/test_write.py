"""Token shards written from Ray Data (pipelines/write.py write_shards): balanced, predictably named,
in the dataset's order, uint16 or uint32 by the vocabulary, indexed, with no staging files left."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pyarrow as pa
import pytest

from raylm.core import storage
from raylm.core.artifacts import CuratedDir
from raylm.pipelines.write import write_shards
from raylm.training.data import TokenShards


def packed_dataset(rows: np.ndarray, blocks: int):
    """rows as a Ray Dataset of `input_ids` lists in `blocks` blocks (what curation's pack stage gives
    write_shards), so the shards cut across the blocks they came in."""
    import ray.data

    flat = pa.array(rows.reshape(-1), pa.int32())
    ids = pa.FixedSizeListArray.from_arrays(flat, rows.shape[1]).cast(pa.list_(pa.int32()))
    table = pa.table({"input_ids": ids})
    bounds = np.linspace(0, table.num_rows, blocks + 1).astype(int)
    return ray.data.from_arrow([table.slice(a, b - a) for a, b in itertools.pairwise(bounds)])


@pytest.mark.parametrize(("vocab", "dtype"), [(400, "uint16"), (100_000, "uint32")])
def test_write_shards_keeps_order_and_balance(ray_cluster, tmp_path, vocab, dtype):
    rows = np.random.default_rng(0).integers(0, vocab, size=(230, 8))
    curated = CuratedDir(str(tmp_path))
    written = write_shards(packed_dataset(rows, blocks=7), curated.shards, "train", 50, vocab_size=vocab)
    assert [w["file"] for w in written] == [CuratedDir.shard_name("train", i) for i in range(5)]
    sizes = [w["rows"] for w in written]
    assert sum(sizes) == 230 and max(sizes) - min(sizes) <= 1, sizes
    index = storage.read_json(curated.shard_index_path("train"))
    assert [{"file": s["file"], "rows": s["rows"]} for s in index["shards"]] == written
    assert {s["dtype"] for s in index["shards"]} == {dtype}
    assert sorted(os.listdir(curated.shards)) == sorted([w["file"] for w in written] + ["train.index.json"])
    shards = TokenShards.open(curated.root, "train")
    assert np.array_equal(shards[:], rows)  # the dataset's order, across blocks and shards
    shards.close()


def test_write_shards_of_nothing_writes_nothing(ray_cluster, tmp_path):
    import ray.data

    empty = ray.data.from_arrow(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}))
    curated = CuratedDir(str(tmp_path))
    assert write_shards(empty, curated.shards, "eval", 10) == []
    assert curated.shard_files("eval") == [] and TokenShards.open(curated.root, "eval") is None
