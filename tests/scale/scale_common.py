"""What the scale test and its scenario script share: the corpus, the two stages' configs, and the
comparison of two curated folders that holds whatever the token shard format is."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))
from check_curate import equal, files, parquet_folders

# Manifest entries that legitimately differ between two runs of the same curation: when, where, how long.
VOLATILE = ("created_at", "host", "timings")


def write_corpus(root: Path, docs: int = 140) -> str:
    """English-looking documents with planted near duplicates (tests/synthetic.py), exact copies, and
    rows that curation sets aside (malformed JSON, a repeated id, a document too short for the filters),
    in four jsonl files."""
    from tests.synthetic import generate_corpus

    rows = generate_corpus(docs, seed=3, min_words=60, max_words=200).docs
    lines = [json.dumps(r) for r in rows]
    lines += [json.dumps({"id": f"copy-{r['id']}", "text": r["text"]}) for r in rows[:8]]
    lines += ['{"id": "broken", "text": ', json.dumps({"id": rows[0]["id"], "text": rows[1]["text"]})]
    lines += [json.dumps({"id": "short", "text": "Too short to keep."})]
    root.mkdir(parents=True)
    for part in range(4):
        (root / f"part-{part}.jsonl").write_text("\n".join(lines[part::4]) + "\n")
    return str(root)


def curate_config(corpus: str, run_dir: Path):
    """Curation as the chaos test runs it (seq_len 32, a 400-token BPE, eval 10%), near dedup on."""
    from curate_chaos import config

    return config(Path(corpus), run_dir, light=False)


def train_config(curated: str, run_dir: Path, max_steps: int):
    """tests/training's tiny 2-worker ZeRO-3 run (1 CPU per worker) on a curated folder; no restarts, so a
    failure on one node shows up instead of being retried."""
    from tests.training.train_helpers import tiny_run

    checkpoint = {"every_steps": 4, "keep_last": 2, "max_failures": 0}
    return tiny_run(
        curated, run_dir, max_steps=max_steps, eval_every=4, checkpoint=checkpoint, report_every=4
    )


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stable_manifest(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "manifest.json")) as f:
        doc = {k: v for k, v in json.load(f).items() if k not in VOLATILE}
    doc["config"] = {k: v for k, v in doc["config"].items() if k != "output"}
    return doc


def curated_differences(a: str, b: str) -> list[str]:
    """What differs between two curated folders. Files whose names raylm chooses (token shards and their
    index, whatever the format; the tokenizer; markers) by bytes; the tables Ray Data writes under names
    of its own or in task order (docs/, rejects/, dedup/) as tables sorted by id; manifest.json without
    its timings, timestamps, host and output path."""
    names_a, names_b = files(a), files(b)
    tables_a, tables_b = parquet_folders(a, names_a), parquet_folders(b, names_b)
    folders = sorted(set(tables_a) | set(tables_b))
    diffs = [f"tables differ in {d or '.'}/" for d in folders if not equal(tables_a, tables_b, d)]
    by_name = {n for n in names_a | names_b if n.startswith("shards/") or not n.endswith(".parquet")}
    by_name -= {"manifest.json", ".raylm-output.json"}  # their timestamps differ; compared below
    diffs += [f"only in one: {n}" for n in sorted(by_name - (names_a & names_b))]
    same = sorted(by_name & names_a & names_b)
    diffs += [f"bytes differ: {n}" for n in same if digest(f"{a}/{n}") != digest(f"{b}/{n}")]
    if stable_manifest(a) != stable_manifest(b):
        diffs.append("manifest.json differs beyond timings, timestamps, host and output path")
    return diffs


# Caches that libraries keep in a node's HOME: node-local by nature (each node fills its own; nothing reads
# another node's), so they do not assume a shared disk. matplotlib builds its font list on first import
# (rank 0 draws the loss curve) and makes its config folder; DeepSpeed's CPU backend JIT-builds its
# shared-memory op on first use (and takes a lock file next to it even when it is built).
LIBRARY_CACHES = (".cache/matplotlib/", ".config/matplotlib/", ".cache/torch_extensions/")


def outside_storage(paths: list[str], sandbox: str) -> list[str]:
    """The paths that are neither a library cache in a node's HOME nor the audit's own log."""
    homes = [os.path.join(sandbox, "nodes", n, "home") for n in ("head", "w1", "w2")]
    caches = tuple(os.path.join(h, c) for h in homes for c in LIBRARY_CACHES)
    caches += tuple(c.rstrip("/") for c in caches) + tuple(os.path.dirname(c.rstrip("/")) for c in caches)
    return [p for p in paths if not (p.startswith(caches) or p in caches)]
