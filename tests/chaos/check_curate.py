"""Two curated folders compared by content: the parquet files of each folder as one table (Ray Data names
its output files after the dataset run, so names differ between any two runs, and the rows of files
written by parallel tasks come in no fixed order: sorted by `id` where there is one), the token shards
(named by raylm) file by file, JSON documents without their timestamps and timings, everything else
byte for byte."""

from __future__ import annotations

import json
import os
from collections import defaultdict

# What legitimately differs between the JSON documents of two runs of the same curation.
VOLATILE = {"timings", "created_at", "host"}


def files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def stable(doc: dict) -> dict:
    out = {k: v for k, v in doc.items() if k not in VOLATILE}
    if isinstance(out.get("config"), dict):
        out["config"] = {k: v for k, v in out["config"].items() if k != "output"}
    return out


def table(paths: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(p) for p in sorted(paths)]) if paths else None
    if t is not None and "id" in t.column_names:
        t = t.sort_by("id")
    return t


def same_file(a: str, b: str) -> bool:
    if a.endswith(".parquet"):  # a token shard: the same rows in the same order
        return table([a]).equals(table([b]))
    if a.endswith(".json"):
        with open(a) as fa, open(b) as fb:
            return stable(json.load(fa)) == stable(json.load(fb))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def parquet_folders(root: str, names: set[str]) -> dict[str, list[str]]:
    """Parquet files outside shards/, grouped by folder (those Ray Data writes and names)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if name.endswith(".parquet") and not name.startswith("shards/"):
            groups[os.path.dirname(name)].append(os.path.join(root, name))
    return groups


def compare_outputs(clean: str, other: str) -> list[str]:
    """What differs between two curated folders (empty: equal)."""
    if not os.path.isdir(other):
        return [f"{other} is missing"]
    a, b = files(clean), files(other)
    ta, tb = parquet_folders(clean, a), parquet_folders(other, b)
    diffs = [f"tables differ in {d or '.'}/" for d in sorted(set(ta) | set(tb)) if not equal(ta, tb, d)]
    a = {n for n in a if n.startswith("shards/") or not n.endswith(".parquet")}
    b = {n for n in b if n.startswith("shards/") or not n.endswith(".parquet")}
    diffs += [f"only in the clean run: {p}" for p in sorted(a - b)]
    diffs += [f"only in the faulty run: {p}" for p in sorted(b - a)]
    both = sorted(a & b)
    diffs += [f"differs: {p}" for p in both if not same_file(os.path.join(clean, p), os.path.join(other, p))]
    return diffs


def equal(ta: dict[str, list[str]], tb: dict[str, list[str]], folder: str) -> bool:
    x, y = table(ta.get(folder, [])), table(tb.get(folder, []))
    return (x is None and y is None) or (x is not None and y is not None and x.equals(y))
