"""Shared by the curation tests: a small corpus with known defects, its recipe, and one curated output
made from it once per session (test_curate.py checks the output contract, test_report.py draws it)."""

import json
import random

import pytest

from raylm.core.config import build_config
from tests.synthetic import document


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("corpus")
    docs = [{"id": f"d{i:03d}", "text": document(rng)} for i in range(120)]
    dups = [
        {"id": f"z-copy-of-{d['id']}", "text": d["text"] + "  \n"} for d in docs[:10]
    ]  # equal once normalized
    lines = [json.dumps(d) for d in docs + dups]
    lines[5:5] = [
        "{broken json",
        json.dumps({"id": "no-text"}),
        json.dumps({"id": "short", "text": "Too short."}),
    ]
    (root / "part-0.jsonl").write_text("\n".join(lines[:70]) + "\n")
    (root / "part-1.jsonl").write_bytes(
        ("\n".join(lines[70:]) + "\n").encode() + b'{"id": "u", "text": "bad \xff"}\n'
    )
    (root / "empty.jsonl").write_text("")
    return root


def config(corpus, out, **data):
    return build_config(
        {
            "name": "t",
            "run_dir": str(out),
            "data": {
                "sources": [{"path": str(corpus)}],
                "seq_len": 32,
                "rows_per_shard": 50,
                "tokenizer": {"vocab_size": 400},
                "eval_fraction": 0.1,
                **data,
            },
        }
    )


@pytest.fixture(scope="session")
def curated(ray_cluster, corpus, tmp_path_factory):
    """The corpus curated once for the session; tests read it and must not change it."""
    from raylm.pipelines.run import run

    cfg = config(corpus, tmp_path_factory.mktemp("run"))
    run(cfg)
    return cfg.data.output
