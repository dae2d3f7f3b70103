"""Fixtures of the training tests: a curated folder built here (the pipelines/ output contract), not by
running the pipeline: packed rows of exactly seq_len tokens, eos-separated, in train/eval token shards
(written by pipelines/write.py, the writer curation uses)."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

from raylm.core import lineage
from raylm.core.artifacts import CURATED, CuratedDir
from raylm.pipelines.write import write_token_split
from tests.synthetic import sample_text

SEQ_LEN = 32


def build_curated(
    tokenizer_dir: str,
    out,
    seq_len: int = SEQ_LEN,
    train_rows: int = 96,
    eval_rows: int = 16,
    rows_per_shard: int = 48,
    seed: int = 0,
) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    stream: list[int] = []
    need = (train_rows + eval_rows) * seq_len
    while len(stream) < need:
        stream += tok(sample_text(rng, rng.randint(10, 60)), add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
    rows = np.asarray(stream[:need], dtype=np.int32).reshape(-1, seq_len)
    curated = CuratedDir(str(out))
    os.makedirs(curated.shards)
    splits = {"train": rows[:train_rows], "eval": rows[train_rows:]}
    counts = {}
    for split, data in splits.items():
        write_token_split(curated.shards, split, data, rows_per_shard, vocab_size=len(tok))
        counts[f"{split}_sequences"] = len(data)
    shutil.copytree(tokenizer_dir, curated.tokenizer)
    lineage.write_manifest(
        curated.root, CURATED, {"seq_len": seq_len}, seq_len=seq_len, vocab_size=len(tok), counts=counts
    )
    return str(out)


@pytest.fixture(scope="session")
def curated_dir(tiny_tokenizer_dir, tmp_path_factory):
    return build_curated(tiny_tokenizer_dir, tmp_path_factory.mktemp("curated"))
