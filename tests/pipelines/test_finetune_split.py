"""The held-apart fine-tuning splits: how documents are assigned (one hash of the id), the config's
checks, and one curation that writes finetune / finetune_eval shards from those documents only."""

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import xxhash

from raylm.core.artifacts import SPLITS, CuratedDir
from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.core.lineage import read_manifest
from raylm.pipelines.pack import SPLITS_BY_HASH, assign_split, pack_rows, split_bounds
from raylm.pipelines.run import _held_apart_line, run
from raylm.pipelines.tokenize import Tokenize
from raylm.training.data import TokenShards
from tests.synthetic import document

IDS = pa.array([f"doc-{i}" for i in range(10_000)])
HELD_APART = ["finetune", "finetune_eval"]


def old_eval_split(ids: pa.Array, eval_fraction: float) -> list[str]:
    """The assignment before held-apart splits existed (pipelines/pack.py eval_split), kept verbatim."""
    cutoff = int(eval_fraction * 2**32)
    return [
        "eval" if xxhash.xxh32_intdigest(i.encode("utf-8")) < cutoff else "train" for i in ids.to_pylist()
    ]


def test_every_split_has_a_share_of_the_hash_range():
    assert sorted(SPLITS_BY_HASH) == sorted(SPLITS)


@pytest.mark.parametrize("eval_fraction", [0.0, 0.02, 0.1, 0.5])
def test_no_finetune_fraction_reproduces_the_old_assignment(eval_fraction):
    expected = old_eval_split(IDS, eval_fraction)
    for finetune_eval_fraction in (0.1, 0.9):
        got = assign_split(IDS, eval_fraction, 0.0, finetune_eval_fraction)
        assert got.type == pa.string() and got.to_pylist() == expected
    assert split_bounds(eval_fraction, 0.0, 0.5) == [int(eval_fraction * 2**32)] * 3


def test_assignment_is_deterministic_and_independent_of_batching():
    whole = assign_split(IDS, 0.05, 0.3, 0.2)
    assert whole.equals(assign_split(IDS, 0.05, 0.3, 0.2))
    chunked = pa.chunked_array([IDS.slice(0, 1), IDS.slice(1, 4321), IDS.slice(4322)])
    assert assign_split(chunked, 0.05, 0.3, 0.2).equals(whole)
    assert assign_split(IDS.slice(0, 0), 0.05, 0.3, 0.2).to_pylist() == []


def test_fractions_are_respected():
    counts = Counter(assign_split(IDS, 0.05, 0.3, 0.2).to_pylist())
    assert set(counts) == set(SPLITS) and sum(counts.values()) == len(IDS)
    expected = {"eval": 0.05, "finetune_eval": 0.3 * 0.2, "finetune": 0.3 * 0.8, "train": 0.65}
    for split, share in expected.items():  # binomial sd on 10k ids is at most 0.005
        assert abs(counts[split] / len(IDS) - share) < 0.015, (split, counts)


def test_held_apart_documents_come_only_from_train():
    """Holding documents apart never moves an eval document, and a larger fraction only adds to it."""
    before, small, large = (
        np.array(assign_split(IDS, 0.1, fraction, 0.5).to_pylist()) for fraction in (0.0, 0.1, 0.3)
    )
    assert np.array_equal(before == "eval", small == "eval") and np.array_equal(
        small == "eval", large == "eval"
    )
    held_small, held_large = np.isin(small, HELD_APART), np.isin(large, HELD_APART)
    assert held_small.sum() > 0 and (before[held_small] == "train").all()
    assert not (held_small & ~held_large).any()  # held apart at 0.1, still held apart at 0.3


def data_config(tmp_path, **data):
    return build_config(
        {
            "name": "t",
            "run_dir": str(tmp_path),
            "data": {"sources": [{"path": str(tmp_path)}], **data},
        }
    )


@pytest.mark.parametrize("eval_fraction,finetune_fraction", [(0.2, 0.8), (0.5, 0.6), (0.0, 1.0)])
def test_splits_that_leave_no_training_data_are_config_errors(tmp_path, eval_fraction, finetune_fraction):
    with pytest.raises(ConfigError) as err:
        data_config(tmp_path, eval_fraction=eval_fraction, finetune_fraction=finetune_fraction)
    assert "eval_fraction" in str(err.value) and "finetune_fraction" in str(err.value)


@pytest.mark.parametrize("share", [0, 1, -0.1, True])
def test_finetune_eval_fraction_is_a_proper_share(tmp_path, share):
    with pytest.raises(ConfigError, match=r"data\.finetune_eval_fraction"):
        data_config(tmp_path, finetune_fraction=0.3, finetune_eval_fraction=share)


def test_defaults_hold_nothing_apart(tmp_path):
    data = data_config(tmp_path).data
    assert data.finetune_fraction == 0 and data.finetune_eval_fraction == 0.1
    assert data_config(tmp_path, eval_fraction=0.1, finetune_fraction=0.3).data.finetune_fraction == 0.3


def test_summary_shows_held_apart_documents_only_when_there_are_some():
    counts = {"finetune_documents": 0, "finetune_eval_documents": 0, "sequences": dict.fromkeys(SPLITS, 0)}
    assert _held_apart_line(counts) == ""
    counts.update(finetune_documents=27, finetune_eval_documents=12)
    counts["sequences"].update(finetune=80, finetune_eval=31)
    line = _held_apart_line(counts)
    assert "39 documents" in line and "80 finetune + 31 finetune_eval sequences" in line


@pytest.fixture(scope="module")
def curated(ray_cluster, tmp_path_factory):
    """120 documents, 10% eval and 40% held apart (30% of those finetune_eval): one pack bucket."""
    rng = random.Random(11)
    corpus = tmp_path_factory.mktemp("corpus")
    rows = [json.dumps({"id": f"d{i:03d}", "text": document(rng)}) for i in range(120)]
    (corpus / "part-0.jsonl").write_text("\n".join(rows) + "\n")
    cfg = build_config(
        {
            "name": "t",
            "run_dir": str(tmp_path_factory.mktemp("run")),
            "data": {
                "sources": [{"path": str(corpus)}],
                "seq_len": 32,
                "rows_per_shard": 40,
                "tokenizer": {"vocab_size": 400},
                "near_dedup": {"enabled": False},
                "eval_fraction": 0.1,
                "finetune_fraction": 0.4,
                "finetune_eval_fraction": 0.3,
            },
        }
    )
    run(cfg)
    return CuratedDir(cfg.data.output)


def expected_rows(curated: CuratedDir, docs: pa.Table, split: str) -> np.ndarray:
    """The split's sequences rebuilt from its documents alone: tokenized, in id order, packed."""
    part = docs.filter(pc.equal(docs["split"], split)).sort_by("id")
    tokens = Tokenize(curated.tokenizer)(part).column("input_ids").to_numpy(zero_copy_only=False)
    return pack_rows([np.asarray(t, dtype=np.int32) for t in tokens], 32)


@pytest.mark.slow
def test_curation_writes_held_apart_shards_from_held_apart_documents_only(curated):
    manifest, docs = read_manifest(curated.root), pq.read_table(curated.docs)
    ids = docs["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 120  # each kept document once, so in exactly one split
    per_split = Counter(docs["split"].to_pylist())
    counts = manifest["counts"]
    assert counts["eval_documents"] == per_split["eval"]
    assert counts["finetune_documents"] == per_split["finetune"] > 0
    assert counts["finetune_eval_documents"] == per_split["finetune_eval"] > 0
    assert set(counts["sequences"]) == set(SPLITS)
    for split in SPLITS:
        files = curated.shard_files(split)
        assert [f.rsplit("/", 1)[-1] for f in files] == [s["file"] for s in manifest["shards"][split]]
        rows = TokenShards.open(curated.root, split)[:]
        assert len(rows) == counts["sequences"][split] > 0, split
        # One pack bucket: the shards are exactly this split's documents packed, and nothing else.
        assert np.array_equal(rows, expected_rows(curated, docs, split)), split
