"""Whole curation pipeline: raylm (Ray Data, 2 CPUs) against datatrove 0.10.1 (LocalPipelineExecutor,
tasks=2, workers=2), on the same generated corpus with planted near-duplicates and exact ground truth.

Both sides: read jsonl -> normalize (NFKC, control characters, whitespace) -> Gopher quality and
repetition filters (the same thresholds: raylm's FilterConfig defaults are datatrove's) -> exact dedup
-> MinHash near dedup (word 5-gram shingles, 128 permutations, raylm's bands x rows, seed 1) -> kept
documents written to disk. Tokenization is left out of both sides; so is PII scrubbing (datatrove's
PIIFormatter has no phone rule, so it would not be the same work). datatrove also runs its C4 quality
filter (without the downloaded bad-words list); raylm has no C4 line rules, so that is extra work on
datatrove's side, reported in its per-step times. Language ID and KenLM are left out of both (they download).

datatrove's pipeline is its documented one: filters + writer + exact-dedup signatures (2 tasks), exact
dedup finder (1 task), exact dedup filter + writer + MinHash signatures (2 tasks), MinHash buckets (one
task per bucket), clusters (1 task), MinHash filter + writer (2 tasks). Intermediate jsonl is written
uncompressed (datatrove's writers gzip by default, which would only slow it down).

Each side runs in its own subprocess; peak memory is the proportional set size (PSS) of that
subprocess and all its descendants (raylm: driver, raylet, GCS, every Ray worker and object store
pages; datatrove: its worker processes), sampled every 0.2 s. MB/s = input bytes / wall time of the
pipeline (Ray start-up is reported apart and not included; datatrove has none).

Dedup scores (tests.synthetic.score_clusters) over the documents that reached dedup on each side (those
that passed the filters), against the planted truth restricted to them; an exact duplicate counts as
a member of the cluster of the document it duplicates (datatrove's exact-dedup filter does not say which
one, so its exact duplicates are matched to their keeper by text after the run, outside the timing).

    .venv/bin/python benchmarks/curate.py                 # the full run (~110 MB of text)
    .venv/bin/python benchmarks/curate.py --docs 3000     # a quick check
    py-spy record --subprocesses --format raw -o raylm.txt -- \\
        .venv/bin/python benchmarks/curate.py --side raylm          # profile raylm's side alone
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dedup import PeakMemory  # noqa: E402

WORK = ROOT / ".bench" / "curate-work"


def xxhash64_of_str(data: str | bytes) -> int:
    """datatrove 0.10.1 hashes shingle strings with xxhash.xxh64_intdigest(str), which xxhash >= 4 (the
    version raylm installs) refuses; this is the same hash of the UTF-8 bytes."""
    import xxhash

    return xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def text_of(doc) -> bytes:
    """What datatrove's exact dedup hashes: the UTF-8 text (its xxhash functions take bytes)."""
    return doc.text.encode("utf-8")


def _junk(rng, words: list[str], k: int) -> dict:
    """A document that a quality filter should drop: short, digit-heavy, hash-heavy or repetitive."""
    pick = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    kind = k % 4
    if kind == 0:
        text = pick(int(rng.integers(5, 40))).capitalize() + "."
    elif kind == 1:
        text = " ".join(
            f"{pick(3)} {int(rng.integers(10**6, 10**9))} {int(rng.integers(10**6))}" for _ in range(60)
        )
    elif kind == 2:
        text = " ".join(f"# {pick(4)} ..." for _ in range(60))
    else:
        text = "\n".join([pick(12).capitalize() + "."] * 30)
    return {"id": f"junk-{k:07d}", "text": text}


def corpus(args) -> tuple[Path, Path]:
    """Generate once per (docs, seed, words): docs/*.jsonl (planted families, ~1% exact copies under new
    ids, ~3% low-quality documents) and truth.jsonl (every in-family pair, copies at Jaccard 1.0)."""
    import numpy as np

    from tests.synthetic import COMMON_WORDS, generate_corpus, write_corpus

    folder = ROOT / ".bench" / f"curate-corpus-{args.docs}-{args.seed}-{args.min_words}-{args.max_words}"
    if not (folder / "truth.jsonl").exists():
        generated = generate_corpus(
            args.docs, seed=args.seed, min_words=args.min_words, max_words=args.max_words
        )
        rng = np.random.default_rng(args.seed + 1)
        copies = rng.choice(len(generated.docs), size=len(generated.docs) // 100, replace=False)
        for k, i in enumerate(copies):
            original = generated.docs[int(i)]
            copy_id = f"copy-{k:07d}"
            generated.docs.append({"id": copy_id, "text": original["text"]})
            generated.pairs.append((min(copy_id, original["id"]), max(copy_id, original["id"]), 1.0))
        words = np.array(COMMON_WORDS[:2000])
        generated.docs += [_junk(rng, words, k) for k in range(len(generated.docs) * 3 // 100)]
        order = rng.permutation(len(generated.docs))
        generated.docs = [generated.docs[i] for i in order]
        tmp = folder.with_suffix(".tmp")
        write_corpus(generated, tmp / "docs", shards=args.shards, compress=False)
        (tmp / "docs" / "truth.jsonl").rename(tmp / "truth.jsonl")
        tmp.rename(folder)
    return folder / "docs", folder / "truth.jsonl"


def run_raylm(docs: Path, out: Path, num_cpus: int) -> dict:
    import ray

    from raylm.core.artifacts import CuratedDir
    from raylm.pipelines import readers
    from raylm.pipelines import run as curate
    from raylm.pipelines.config import DataConfig
    from raylm.pipelines.dedup.near import bands_and_rows

    data = DataConfig(sources=[{"path": str(docs)}], output=str(out), pii={"enabled": False})
    start = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - start
    with PeakMemory() as memory:
        start = time.perf_counter()
        files = readers.find_inputs(data.sources).files
        tally, times = curate.Tally(), curate.Timings()
        curate.curate_documents(data, files, num_cpus, CuratedDir(str(out)), tally, times)
        wall = time.perf_counter() - start
    ray.shutdown()
    return {
        "wall_s": wall,
        "peak_memory_mb": memory.peak / 2**20,
        "ray_startup_s": startup,
        "phase_s": times.seconds,
        "bands_rows": list(bands_and_rows(data.near_dedup)),
        "after_filters": tally.after_filters,
        "docs_kept": tally.after_near_dedup,
    }


def _datatrove_normalize():
    """raylm's Normalize (NFKC, control characters, whitespace) as a datatrove formatter."""
    import re
    import unicodedata

    from datatrove.pipeline.formatters.base import BaseFormatter

    control = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\ufeff]")
    rules = [
        (re.compile(r"\r\n?"), "\n"),
        (re.compile(r"[ \t\f\v\xa0]+"), " "),
        (re.compile(r" ?\n ?"), "\n"),
    ]
    rules.append((re.compile(r"\n{3,}"), "\n\n"))

    class Normalize(BaseFormatter):
        name = "normalize"

        def format(self, text: str) -> str:
            text = control.sub("", unicodedata.normalize("NFKC", text))
            for pattern, repl in rules:
                text = pattern.sub(repl, text)
            return text.strip()

    return Normalize()


def run_datatrove(docs: Path, work: Path, bands: int, rows: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from raylm.pipelines.config import NearDedupConfig

    near = NearDedupConfig()
    minhash = MinhashConfig(n_grams=near.ngram, num_buckets=bands, hashes_per_bucket=rows, seed=near.seed)
    exact = ExactDedupConfig(content_getter=text_of)
    w = {k: str(work / k) for k in ("filtered", "exact_sigs", "exact_dups", "exact_kept", "exact_removed")}
    w |= {k: str(work / k) for k in ("mh_sigs", "mh_buckets", "mh_clusters", "final", "near_removed", "logs")}

    signatures = MinhashDedupSignature(w["mh_sigs"], config=minhash)
    signatures._hash_func = xxhash64_of_str

    def writer(key: str):
        return JsonlWriter(w[key], compression=None, expand_metadata=True)

    def executor(pipeline, tasks: int, name: str, workers: int = 2):
        return LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=workers, logging_dir=f"{w['logs']}/{name}"
        )

    stages = [
        (
            "filter",
            2,
            [
                JsonlReader(str(docs), glob_pattern="docs-*.jsonl", id_key="id", text_key="text"),
                _datatrove_normalize(),
                GopherRepetitionFilter(),
                GopherQualityFilter(),
                C4QualityFilter(),
                writer("filtered"),
                ExactDedupSignature(w["exact_sigs"], config=exact),
            ],
        ),
        ("exact_find", 1, [ExactFindDedups(w["exact_sigs"], w["exact_dups"], config=exact)]),
        (
            "exact_filter",
            2,
            [
                JsonlReader(w["filtered"], id_key="id", text_key="text"),
                ExactDedupFilter(w["exact_dups"], config=exact, exclusion_writer=writer("exact_removed")),
                writer("exact_kept"),
                signatures,
            ],
        ),
        ("minhash_buckets", bands, [MinhashDedupBuckets(w["mh_sigs"], w["mh_buckets"], config=minhash)]),
        (
            "minhash_cluster",
            1,
            [MinhashDedupCluster(w["mh_buckets"], w["mh_clusters"], config=minhash, save_cluster_id=True)],
        ),
        (
            "minhash_filter",
            2,
            [
                JsonlReader(w["exact_kept"], id_key="id", text_key="text"),
                MinhashDedupFilter(
                    w["mh_clusters"], exclusion_writer=writer("near_removed"), load_cluster_ids=True
                ),
                writer("final"),
            ],
        ),
    ]
    phase_s = {}
    with PeakMemory() as memory:
        start = time.perf_counter()
        for name, tasks, pipeline in stages:
            lap = time.perf_counter()
            executor(pipeline, tasks, name, workers=min(2, tasks)).run()
            phase_s[name] = round(time.perf_counter() - lap, 3)
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "peak_memory_mb": memory.peak / 2**20,
        "phase_s": phase_s,
        "step_s": _datatrove_step_times(work / "logs"),
        "bands_rows": [bands, rows],
        "after_filters": _count_lines(work / "filtered"),
        "docs_kept": _count_lines(work / "final"),
    }


def _datatrove_step_times(logs: Path) -> dict[str, float]:
    """Seconds per pipeline step, summed over tasks, from datatrove's own stats.json files."""
    out: dict[str, float] = {}
    for stats in sorted(logs.glob("*/stats.json")):
        for step in json.loads(stats.read_text()):
            total = step.get("time_stats", {}).get("total", 0.0)
            out[f"{stats.parent.name}: {step['name']}"] = round(total, 2)
    return out


def _count_lines(folder: Path) -> int:
    return sum(sum(1 for _ in open(p, encoding="utf-8")) for p in folder.glob("*.jsonl"))


def _jsonl_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


def datatrove_clusters(work: Path) -> dict[str, str]:
    """id -> cluster for every document that passed datatrove's filters: its MinHash cluster (or itself),
    and for an exact duplicate the cluster of the kept document with the same text."""
    cluster_of, by_text = {}, {}
    for folder in ("final", "near_removed"):
        for row in _jsonl_rows(work / folder):
            cluster = row.get("minhash_cluster_id", row.get("metadata", {}).get("minhash_cluster_id", -1))
            cluster_of[row["id"]] = f"cluster-{cluster}" if cluster != -1 else row["id"]
            by_text[row["text"]] = cluster_of[row["id"]]
    for row in _jsonl_rows(work / "exact_removed"):
        cluster_of[row["id"]] = by_text[row["text"]]
    return cluster_of


def raylm_clusters(out: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    from raylm.core.artifacts import CuratedDir

    table = pq.read_table(CuratedDir(str(out)).clusters, columns=["id", "cluster_id"])
    return dict(zip(table.column("id").to_pylist(), table.column("cluster_id").to_pylist()))


def score(cluster_of: dict[str, str], truth: Path, threshold: float) -> dict:
    from tests.synthetic import read_truth, score_clusters

    pairs = [(a, b, j) for a, b, j in read_truth(truth) if a in cluster_of and b in cluster_of]
    return score_clusters(cluster_of, pairs, threshold)


def run_side(side: str, args, docs: Path) -> dict:
    """One side in a subprocess of its own (clean peak memory); returns its RESULT line."""
    cmd = [sys.executable, __file__, "--side", side, *_passed_args(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{side} failed:\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _passed_args(args) -> list[str]:
    keys = ("docs", "min_words", "max_words", "seed", "shards", "num_cpus")
    return [a for k in keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def side_main(args, docs: Path) -> None:
    out = WORK / args.side
    if out.exists():
        shutil.rmtree(out)
    if args.side == "raylm":
        result = run_raylm(docs, out, args.num_cpus)
    else:
        from raylm.pipelines.config import NearDedupConfig
        from raylm.pipelines.dedup.near import bands_and_rows

        result = run_datatrove(docs, out, *bands_and_rows(NearDedupConfig()))
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=60_000, help="generated documents before copies and junk")
    parser.add_argument("--min-words", type=int, default=250)
    parser.add_argument("--max-words", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--sides", default="raylm,datatrove")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "curate.json"))
    parser.add_argument("--side", choices=["raylm", "datatrove"], help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()

    start = time.perf_counter()
    docs, truth = corpus(args)
    if args.side:
        side_main(args, docs)
        return
    from raylm.pipelines.config import NearDedupConfig

    near = NearDedupConfig()
    in_bytes = sum(p.stat().st_size for p in docs.glob("docs-*.jsonl"))
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": "2-core CPU VM, no GPU",
        "command": " ".join([".venv/bin/python", "benchmarks/curate.py", *sys.argv[1:]]),
        "corpus": {
            "generated_docs": args.docs,
            "input_mb": round(in_bytes / 1e6, 1),
            "files": len(list(docs.glob("docs-*.jsonl"))),
            "generation_or_load_s": round(time.perf_counter() - start, 1),
            "words_per_doc": [args.min_words, args.max_words],
        },
        "params": {
            "ngram": near.ngram,
            "num_perm": near.num_perm,
            "threshold": near.threshold,
            "seed": near.seed,
        },
        "tokenization": "left out of both sides",
    }
    for side in args.sides.split(","):
        result = run_side(side, args, docs)
        if "ray_startup_s" in result:
            print(f"ray start-up: {result['ray_startup_s']:.1f} s (not in raylm's wall time)")
        result["mb_per_s"] = in_bytes / 1e6 / result["wall_s"]
        clusters = raylm_clusters(WORK / side) if side == "raylm" else datatrove_clusters(WORK / side)
        result.update(score(clusters, truth, near.threshold))
        report[side] = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
        print(side, json.dumps(report[side]), flush=True)
    if "raylm" in report and "datatrove" in report:
        ratio = report["raylm"]["mb_per_s"] / report["datatrove"]["mb_per_s"]
        report["throughput_ratio_raylm_over_datatrove"] = round(ratio, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
