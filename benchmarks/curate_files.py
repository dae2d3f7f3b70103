"""Curation's cleaning pass on a corpus of a few files: how the read is planned decides how many CPUs work.

The pass is read -> normalize -> PII -> quality filters (pipelines/run.py `_clean`). Ray Data fuses
consecutive map operators, and a fused task takes max(batch sizes) input rows: with the stages asking for
batches of data.batch_size (512) rows, that is 512 FILES per task, so a corpus of 8 files was cleaned by
one task. Four plans, side by side in one Ray session on the same generated corpus (8 JSONL files):

  stage_batches             each stage asks for batch_size=512 (raylm before this benchmark)
  stage_batches_noreserve   the same without Ray Data's per-operator resource reservation
  reader_batches            the reader yields 512-row tables, the stages take them whole (batch_size=None)
  reader_batches_noreserve  that, without the reservation (what raylm runs: run.all_cpus_to_each_operator)

Each plan runs three times; the best time counts (the machine may be shared). Ratios are to stage_batches.

    .venv/bin/python benchmarks/curate_files.py            # 8 files, ~31 MB, 2 CPUs; .bench/curate_files.json
    .venv/bin/python benchmarks/curate_files.py --docs 1500 --cpus 2   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

WORDS = [
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "was",
    "that",
    "for",
    "it",
    "with",
    "as",
    "his",
    "on",
    "be",
    "at",
    "by",
    "had",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "her",
    "she",
    "there",
    "would",
    "their",
    "we",
    "him",
    "been",
    "has",
    "when",
    "who",
    "will",
    "no",
    "more",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "than",
    "into",
    "them",
    "can",
    "only",
    "other",
    "time",
    "new",
    "some",
    "could",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
]
PLANS = ("stage_batches", "stage_batches_noreserve", "reader_batches", "reader_batches_noreserve")


def write_corpus(root: Path, files: int, docs: int) -> None:
    rnd = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(root / f"part{f}.jsonl", "w") as out:
            for i in range(docs):
                text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(80, 250)))
                out.write(json.dumps({"id": f"{f}-{i}", "text": text}) + "\n")


@contextmanager
def planned(plan: str, batch_size: int):
    """pipelines/run.py's cleaning pass as it is (reader_batches), or with each stage asking for
    batch_size rows as it did before (stage_batches); and the reservation on or off."""
    import ray.data

    from raylm.pipelines import readers

    context = ray.data.DataContext.get_current()
    context.op_resource_reservation_enabled = not plan.endswith("noreserve")
    original_map, original_read = ray.data.Dataset.map_batches, readers.read_corpus

    def stage_batches(self, fn, *args, **kwargs):
        if kwargs.get("batch_size", "unset") is None:
            kwargs["batch_size"] = batch_size
        return original_map(self, fn, *args, **kwargs)

    if plan.startswith("stage_batches"):
        ray.data.Dataset.map_batches = stage_batches
        readers.read_corpus = lambda files, rows_per_batch: original_read(files)
    try:
        yield
    finally:
        ray.data.Dataset.map_batches, readers.read_corpus = original_map, original_read


def time_plan(plan: str, data, files, repeats: int) -> dict:
    from raylm.pipelines import run as curate

    times, blocks = [], 0
    with planned(plan, data.batch_size):
        for _ in range(repeats):
            start = time.perf_counter()
            ds = curate._clean(data, files).materialize()
            times.append(time.perf_counter() - start)
            blocks = ds.num_blocks()
    return {"best_s": round(min(times), 3), "times_s": [round(t, 3) for t in times], "blocks": blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--docs", type=int, default=5000, help="documents per file")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/raylm-bench-curate-files")
    parser.add_argument("--out", default=".bench/curate_files.json")
    args = parser.parse_args()

    import ray

    from raylm.core.config import build_config
    from raylm.pipelines import readers

    root = Path(args.work) / f"corpus-{args.files}x{args.docs}"
    if not root.exists():
        write_corpus(root, args.files, args.docs)
    data = build_config({"name": "bench", "data": {"sources": [{"path": str(root)}]}}).data
    files = readers.find_inputs(data.sources).files
    mb = sum(f.size for f in files) / 1e6
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    results = {}
    for plan in PLANS:
        results[plan] = time_plan(plan, data, files, args.repeats)
        results[plan]["mb_per_s"] = round(mb / results[plan]["best_s"], 2)
        print(f"{plan:<24} {results[plan]['best_s']:>7.2f} s  {results[plan]['mb_per_s']:>6.2f} MB/s  "
              f"{results[plan]['blocks']} blocks", flush=True)  # fmt: skip
    base = results["stage_batches"]["best_s"]
    for plan in PLANS:
        results[plan]["speedup_vs_stage_batches"] = round(base / results[plan]["best_s"], 2)
    report = {
        "benchmark": "curate_files",
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPUs visible, ray num_cpus={args.cpus}",
        "corpus": {"files": len(files), "mb": round(mb, 2), "documents": args.files * args.docs},
        "batch_size": data.batch_size,
        "plans": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({p: r["speedup_vs_stage_batches"] for p, r in results.items()}), "->", args.out)


if __name__ == "__main__":
    main()
