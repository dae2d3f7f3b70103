"""What the duplicate-id rule (pipelines/unique_ids.py) costs next to the pass it follows.

Curation's first phase reads, normalizes, scrubs and filters the corpus in one streaming pass and
materializes it; the duplicate-id rule then counts ids with one shuffle of (id, source, pos) rows, and
only when ids repeat, marks the later claims. This benchmark times both on the same corpus, in one Ray
session, for three corpora that differ only in their ids:

- unique: every id once (the usual case: the rule costs the count alone);
- repeated-1pct: 1% of the documents re-use another document's id (marked through a lookup table);
- repeated-1pct-join: the same corpus with the lookup table switched off (BROADCAST_LIMIT = 0), i.e. the
  hash-join path that a corpus with more than BROADCAST_LIMIT repeated ids takes.

Each variant runs --reps times, alternating; the figure is the median of the per-rep ratio
id-rule seconds / read-clean-filter seconds. JSON goes to .bench/unique_ids.json.

    .venv/bin/python benchmarks/unique_ids.py --docs 40000 --reps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_corpora(docs: int, folder: Path) -> dict[str, Path]:
    """The same texts three ways: unique ids, and 1% of ids repeated (the other copy in another file)."""
    from tests.synthetic import generate_corpus, write_corpus

    corpus = generate_corpus(docs, seed=0, min_words=150, max_words=300)
    unique = folder / "unique"
    if not unique.exists():
        write_corpus(corpus, unique, shards=8, compress=True)
    repeated = folder / "repeated-1pct"
    if not repeated.exists():
        step = 100  # every 100th document takes the id of the document 50 places before it
        for i in range(50, len(corpus.docs), step):
            corpus.docs[i]["id"] = corpus.docs[i - 50]["id"]
        write_corpus(corpus, repeated, shards=8, compress=True)
    return {"unique": unique, "repeated-1pct": repeated}


def _count_later_claims(t):
    import pyarrow as pa
    import pyarrow.compute as pc

    from raylm.pipelines.filters import reason_kind
    from raylm.pipelines.readers import DUPLICATE_ID

    later = pc.equal(reason_kind(t.column("reject")), DUPLICATE_ID)
    return pa.table({"n": [pc.sum(pc.fill_null(later, False).cast("int64")).as_py() or 0]})


def time_variant(data, folder: Path, parts: int, broadcast_limit: int) -> dict:
    from raylm.pipelines import readers, unique_ids
    from raylm.pipelines.config import SourceConfig
    from raylm.pipelines.run import _clean

    files = readers.find_inputs([SourceConfig(path=str(folder / "docs-*.jsonl.gz"))]).files
    start = time.perf_counter()
    cleaned = _clean(data, files).materialize()
    clean_s = time.perf_counter() - start
    unique_ids.BROADCAST_LIMIT = broadcast_limit
    start = time.perf_counter()
    marked = unique_ids.set_aside_later_claims(cleaned, parts).materialize()
    rule_s = time.perf_counter() - start
    rows = marked.count()
    n_later = int(marked.map_batches(_count_later_claims, batch_format="pyarrow").sum("n") or 0)
    return {"read_clean_filter_s": clean_s, "id_rule_s": rule_s, "rows": rows, "later_claims": n_later}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=40_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / ".bench" / "unique_ids.json"))
    args = p.parse_args(argv)

    import ray

    from raylm.pipelines.config import DataConfig

    folders = write_corpora(args.docs, ROOT / ".bench" / f"unique-ids-corpus-{args.docs}")
    data = DataConfig(sources=[{"path": "unused"}])
    variants = [("unique", "unique", 100_000), ("repeated-1pct", "repeated-1pct", 100_000)]
    variants.append(("repeated-1pct-join", "repeated-1pct", 0))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for rep in range(args.reps):
        for name, corpus, limit in variants:
            result = time_variant(data, folders[corpus], args.num_cpus, limit)
            runs[name].append(result)
            ratio = result["id_rule_s"] / result["read_clean_filter_s"]
            print(
                f"rep {rep} {name:<20} read+clean {result['read_clean_filter_s']:6.1f} s  "
                f"id rule {result['id_rule_s']:5.1f} s  ratio {ratio:.3f}  later claims {result['later_claims']}",
                flush=True,
            )
    ray.shutdown()
    summary = {
        name: {
            "median_ratio": statistics.median(r["id_rule_s"] / r["read_clean_filter_s"] for r in rs),
            "ratios": [round(r["id_rule_s"] / r["read_clean_filter_s"], 4) for r in rs],
            "later_claims": rs[0]["later_claims"],
            "rows": rs[0]["rows"],
        }
        for name, rs in runs.items()
    }
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "docs": args.docs,
        "num_cpus": args.num_cpus,
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\nmedian id-rule / read-clean-filter time:")
    for name, s in summary.items():
        print(f"  {name:<20} {s['median_ratio']:.3f}  ({s['later_claims']} later claims of {s['rows']} rows)")


if __name__ == "__main__":
    main()
