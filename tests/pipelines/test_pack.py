import numpy as np
import pyarrow as pa

from raylm.pipelines.pack import assign_split, pack_group, pack_rows


def test_pack_rows_is_exact_and_drops_only_the_tail():
    docs = [np.arange(5, dtype=np.int32), np.arange(100, 107, dtype=np.int32)]
    rows = pack_rows(docs, 4)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 100, 101, 102], [103, 104, 105, 106]]


def test_pack_stage_separates_splits_and_is_order_independent():
    batch = pa.table(
        {
            "id": ["b", "a", "c"],
            "split": ["train", "train", "eval"],
            "input_ids": pa.array([[3, 4, 0], [1, 2, 0], [9, 9, 9, 0]], pa.list_(pa.int32())),
        }
    )
    out = pack_group(batch, 3)
    assert out.column("split").to_pylist() == ["train", "train", "eval"]
    assert out.column("seq_index").to_pylist() == [0, 1, 2]
    assert out.column("input_ids").to_pylist() == [[1, 2, 0], [3, 4, 0], [9, 9, 9]]
    assert pack_group(batch.take([2, 0, 1]), 3).equals(out)


def test_eval_split_is_a_stable_fraction():
    ids = pa.array([f"doc-{i}" for i in range(20000)])
    split = assign_split(ids, 0.1).to_pylist()
    assert 0.09 < split.count("eval") / len(split) < 0.11
    assert split == assign_split(ids, 0.1).to_pylist()
