"""Near-duplicate removal: raylm (Ray, N CPUs) against datasketch (MinHash + MinHashLSH, one process).

Both read the same generated jsonl corpus, use the same shingles (pipelines/dedup/minhash.py: word
5-grams), 128 permutations and threshold 0.8, and write one (id, cluster_id) row per document to
parquet. Each side runs in its own subprocess so that peak memory is measured cleanly: the proportional
set size (PSS) of the subprocess and all its descendants (for raylm: the driver, raylet, GCS and every
Ray worker, object store pages included), sampled every 0.2 s.

Scores (tests.synthetic.score_clusters), computed identically for both: over pairs of documents.
Predicted pair = two documents with the same cluster_id (datasketch: its LSH query results unioned
into clusters). True pair = two documents connected by a chain of pairs whose exact Jaccard on the
same shingles is >= threshold (the generator measures every pair inside a family; documents of
different families are independent random text). precision = |pred & true| / |pred|, recall =
|pred & true| / |true|, F1 their harmonic mean; direct_recall = share of pairs with Jaccard >= threshold
placed in one cluster.

    .venv/bin/python benchmarks/dedup.py --docs 60000      # the full run (~104 MB of text)
    .venv/bin/python benchmarks/dedup.py --docs 3000       # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakMemory:
    """Samples the PSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def corpus_files(args) -> tuple[list[Path], Path, float]:
    """Generate the corpus once per (docs, seed, words) and reuse it."""
    from tests.synthetic import generate_corpus, write_corpus

    folder = ROOT / ".bench" / f"dedup-corpus-{args.docs}-{args.seed}-{args.min_words}-{args.max_words}"
    start = time.perf_counter()
    if not (folder / "truth.jsonl").exists():
        corpus = generate_corpus(
            args.docs, seed=args.seed, min_words=args.min_words, max_words=args.max_words
        )
        write_corpus(corpus, folder.with_suffix(".tmp"), shards=args.shards, compress=False)
        folder.with_suffix(".tmp").rename(folder)
    return sorted(folder.glob("docs-*.jsonl")), folder / "truth.jsonl", time.perf_counter() - start


def run_raylm(paths: list[str], out: str, num_cpus: int) -> dict:
    import ray

    from raylm.pipelines.config import NearDedupConfig
    from raylm.pipelines.dedup.near import bands_and_rows, near_duplicate_clusters

    cfg = NearDedupConfig()
    start = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - start
    with PeakMemory() as memory:
        start = time.perf_counter()
        docs = ray.data.read_json(paths, lines=True)
        near_duplicate_clusters(docs, cfg).write_parquet(out)
        wall = time.perf_counter() - start
    ray.shutdown()
    return {
        "wall_s": wall,
        "peak_memory_mb": memory.peak / 2**20,
        "ray_startup_s": startup,
        "bands_rows": list(bands_and_rows(cfg)),
        "verify": cfg.verify,
    }


def run_datasketch(paths: list[str], out: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasketch import MinHash, MinHashLSH

    from raylm.pipelines.config import NearDedupConfig
    from raylm.pipelines.dedup.minhash import shingle_sets
    from tests.synthetic import union_find

    cfg = NearDedupConfig()
    with PeakMemory() as memory:
        start = time.perf_counter()
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        ids, signatures = [], []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
            for lo in range(0, len(rows), 1000):
                chunk = rows[lo : lo + 1000]
                for row, shingles in zip(chunk, shingle_sets([r["text"] for r in chunk], cfg.ngram)):
                    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
                    m.update_batch([s.encode() for s in shingles])
                    lsh.insert(row["id"], m)
                    ids.append(row["id"])
                    signatures.append(m)
        cluster_of = union_find(
            ids, [(doc_id, other) for doc_id, m in zip(ids, signatures) for other in lsh.query(m)]
        )
        roots = [cluster_of[i] for i in ids]
        pq.write_table(
            pa.table({"id": ids, "cluster_id": roots, "kept": [i == r for i, r in zip(ids, roots)]}), out
        )
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "peak_memory_mb": memory.peak / 2**20,
        "bands_rows": [lsh.b, lsh.r],
        "verify": False,
    }


def score(out: str, truth_path: Path, threshold: float) -> dict:
    import pyarrow.parquet as pq

    from tests.synthetic import read_truth, score_clusters

    table = pq.read_table(out, columns=["id", "cluster_id", "kept"])
    cluster_of = dict(zip(table.column("id").to_pylist(), table.column("cluster_id").to_pylist()))
    result = score_clusters(cluster_of, read_truth(truth_path), threshold)
    result["docs_out"] = table.num_rows
    result["docs_kept"] = sum(table.column("kept").to_pylist())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=60_000)
    parser.add_argument("--min-words", type=int, default=250)
    parser.add_argument("--max-words", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--skip-datasketch", action="store_true")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "dedup.json"))
    parser.add_argument("--side", choices=["raylm", "datasketch"], help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    paths, truth, generation_s = corpus_files(args)
    if args.side:
        files = [str(p) for p in paths]
        result = (
            run_raylm(files, args.side_out, args.num_cpus)
            if args.side == "raylm"
            else run_datasketch(files, args.side_out)
        )
        print("RESULT " + json.dumps(result))
        return

    from raylm.pipelines.config import NearDedupConfig

    cfg = NearDedupConfig()
    text_mb = 0.0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text_mb += sum(len(json.loads(line)["text"].encode()) for line in f) / 1e6
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": "2-core CPU VM, no GPU",
        "command": " ".join([".venv/bin/python", "benchmarks/dedup.py", *sys.argv[1:]]),
        "corpus": {
            "docs": args.docs,
            "text_mb": round(text_mb, 1),
            "files": len(paths),
            "generation_or_load_s": round(generation_s, 1),
            "words_per_doc": [args.min_words, args.max_words],
        },
        "params": {
            "ngram": cfg.ngram,
            "num_perm": cfg.num_perm,
            "threshold": cfg.threshold,
            "seed": cfg.seed,
        },
    }
    sides = ["raylm"] if args.skip_datasketch else ["raylm", "datasketch"]
    for side in sides:
        side_out = ROOT / ".bench" / f"dedup-{side}.parquet"
        if side_out.is_dir():
            shutil.rmtree(side_out)  # Ray Data adds files to an existing folder
        side_out = str(side_out)
        cmd = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--side-out",
            side_out,
            "--docs",
            str(args.docs),
            "--min-words",
            str(args.min_words),
            "--max-words",
            str(args.max_words),
            "--seed",
            str(args.seed),
            "--shards",
            str(args.shards),
            "--num-cpus",
            str(args.num_cpus),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(lines[-1].removeprefix("RESULT "))
        if "ray_startup_s" in result:
            print(f"ray start-up: {result['ray_startup_s']:.1f} s (not in raylm's wall time)")
        result["mb_per_s"] = text_mb / result["wall_s"]
        result.update(score(side_out, truth, cfg.threshold))
        report[side] = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    if "datasketch" in report:
        report["throughput_ratio_raylm_over_datasketch"] = round(
            report["raylm"]["mb_per_s"] / report["datasketch"]["mb_per_s"], 2
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
