"""Throughput of curation's sensitive-content and language-ID stages, beside normalize, PII scrubbing
and the quality filters for scale, plus the measurements behind the choice of library and matcher.

1. Stages on Ray Data, 1 and 2 CPUs: a generated English corpus (tests/synthetic.py, 80-400 words per
   document; 2% of documents in one of seven other languages from the test sample, 2% with a word of
   the shipped sensitive lists) is written to parquet, read and materialized once; each stage then runs
   alone as `map_batches(stage).materialize()` over those blocks, timed. MB/s = text MB / wall time.
   `identity` (a map that returns its batch) is Ray Data's own cost. Each CPU count runs in its own
   subprocess with its own local Ray (`ray.init(num_cpus=N)`), with Ray Data's defaults and once more
   on the most CPUs without its per-operator resource reservation (which holds a lone map operator to
   one task at a time on 2 CPUs). The same stages are also timed in one process on 512-row tables:
   their own cost, without Ray. Every timing is the best of three runs (the machine may be shared).
   The classifier stage (pipelines/classify.py) runs on an actor pool of 1 and of 2 actors (as many as
   the CPUs allow) with a tiny BERT trained here (tests/pipelines/test_classify.py: 1 layer, hidden 32,
   ~33k parameters, max_length 128): it measures the stage's own machinery (tokenizing, fixed-shape
   padding, the actor pool), not a real model, which costs orders of magnitude more per document.
   Its timings include starting the actors (importing torch and loading the model).
2. Library and matcher choice, one process pinned to one CPU, on the first few MB of the same corpus:
   language ID with langid.py's own `classify`, raylm's batched `LangidModel`, and
   lingua-language-detector (low and high accuracy modes) when it is installed, each with its
   accuracy on the multilingual sample of tests/pipelines/test_langid.py; the sensitive word lists with
   one Python `re` alternation, pyahocorasick (when installed) and the RE2 alternation raylm runs.

    .venv/bin/python benchmarks/curate_stages.py               # ~20 MB, writes .bench/curate_stages.json
    .venv/bin/python benchmarks/curate_stages.py --mb 3        # a quick check
    .venv/bin/pip install langid lingua-language-detector pyahocorasick "torch==2.13.0"  # the peers
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / ".bench" / "curate_stages.json"
WORK = ROOT / ".bench" / "curate-stages-work"
MODEL = WORK / "topic-model"  # the tiny classifier, trained once
BATCH_SIZE = 512
CLASSIFIER_BATCH = 64  # documents per model call
REPEAT = 3  # every timing is the best of this many runs: the machine is shared, and noise only slows


def make_corpus(mb: float, seed: int = 0) -> list[str]:
    import numpy as np

    from raylm.pipelines.config import SensitiveConfig
    from raylm.pipelines.sensitive import load_categories
    from tests.pipelines.test_langid import SAMPLE
    from tests.synthetic import generate_corpus

    rng = np.random.default_rng(seed)
    n_docs = int(mb * 1e6 / 1500) + 1  # documents average about 1.5 KB
    texts = [d["text"] for d in generate_corpus(n_docs, seed=seed, duplicate_fraction=0.0).docs]
    foreign = [" ".join(s) for lang, s in SAMPLE.items() if lang != "en"]
    sensitive = [w for c in load_categories(SensitiveConfig()) for w in _entries_of(c)]
    for i in range(len(texts)):
        draw = rng.random()
        if draw < 0.02:
            texts[i] = foreign[i % len(foreign)]
        elif draw < 0.04:
            texts[i] += f" And then {sensitive[i % len(sensitive)]}."
    return texts


def stages() -> dict:
    from raylm.pipelines.config import (
        FilterConfig,
        LanguageConfig,
        NormalizeConfig,
        PIIConfig,
        SensitiveConfig,
    )
    from raylm.pipelines.filters import QualityFilter
    from raylm.pipelines.langid import LanguageID
    from raylm.pipelines.normalize import Normalize, ScrubPII
    from raylm.pipelines.sensitive import SensitiveContent

    return {
        "identity": lambda t: t,
        "normalize": Normalize(NormalizeConfig()),
        "pii": ScrubPII(PIIConfig()),
        "sensitive content": SensitiveContent(SensitiveConfig()),
        "language ID": LanguageID(LanguageConfig(keep=["en"])),
        "quality filters": QualityFilter(FilterConfig()),
    }


def run_ray(path: Path, num_cpus: int, reservation: bool) -> dict:
    """One CPU count (called in a subprocess): each stage alone over the materialized corpus."""
    import pyarrow.compute as pc
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    # Ray Data reserves half of the cluster's resources per operator by default, which leaves a lone
    # map operator one task at a time on 2 CPUs; --no-reservation measures the stages without that.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = reservation
    ds = ray.data.read_parquet(str(path)).repartition(8 * num_cpus).materialize()
    text_mb = (
        ds.map_batches(
            lambda t: {"n": [pc.sum(pc.binary_length(t.column("text"))).as_py()]}, batch_format="pyarrow"
        ).sum("n")
        / 1e6
    )
    ds.map_batches(lambda t: t, batch_format="pyarrow").materialize()  # start the workers
    results = {}
    for name, stage in stages().items():
        seconds = float("inf")
        for _ in range(REPEAT):
            start = time.perf_counter()
            out = ds.map_batches(stage, batch_format="pyarrow", batch_size=BATCH_SIZE).materialize()
            seconds = min(seconds, time.perf_counter() - start)
        rejected = out.map_batches(
            lambda t: {"n": [t.num_rows - t.column("reject").null_count]},
            batch_format="pyarrow",
        ).sum("n")
        results[name] = {
            "seconds": round(seconds, 2),
            "mb_per_s": round(text_mb / seconds, 2),
            "rejected": rejected,
        }
    for actors in range(1, num_cpus + 1):
        results[f"classifier, tiny BERT, {actors} actor(s)"] = _time_classifier(ds, actors, text_mb)
    ray.shutdown()
    return {"text_mb": round(text_mb, 2), "stages": results}


def tiny_classifier() -> str:
    """The tiny topic classifier of tests/pipelines/test_classify.py, trained once into .bench/."""
    import random

    from raylm.pipelines.tokenize import train_tokenizer
    from tests.pipelines.test_classify import train_topic_classifier
    from tests.synthetic import sample_text

    if not (MODEL / "config.json").exists():
        rng = random.Random(0)
        tok = train_tokenizer(iter([sample_text(rng, 60) for _ in range(400)]), vocab_size=512)
        tok.save_pretrained(WORK / "topic-tokenizer")
        train_topic_classifier(str(WORK / "topic-tokenizer"), MODEL)
    return str(MODEL)


def _time_classifier(ds, actors: int, text_mb: float) -> dict:
    """The classifier stage alone on `actors` actors over the materialized corpus (best of REPEAT)."""
    from raylm.pipelines import classify
    from raylm.pipelines.config import ClassifierConfig

    cfg = ClassifierConfig(path=str(MODEL), batch_size=CLASSIFIER_BATCH, concurrency=actors, max_length=128)
    seconds, startup = float("inf"), float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        classify.score(ds, {"topic": cfg}).materialize()
        seconds = min(seconds, time.perf_counter() - start)
        # The same pool over one batch: about the cost of starting it (imports, loading the model).
        start = time.perf_counter()
        classify.score(ds.limit(CLASSIFIER_BATCH), {"topic": cfg}).materialize()
        startup = min(startup, time.perf_counter() - start)
    return {
        "seconds": round(seconds, 2),
        "mb_per_s": round(text_mb / seconds, 2),
        "startup_seconds": round(startup, 2),
        # None when start-up is most of the run: the difference is then noise (use a larger --mb)
        "mb_per_s_after_startup": (
            round(text_mb / (seconds - startup), 2) if seconds - startup > 0.2 * seconds else None
        ),
        "rejected": 0,
    }


def in_process(texts: list[str], mb: float) -> dict:
    """MB/s of each stage called directly on 512-row tables, one CPU, no Ray: the stage's own cost."""
    import pyarrow as pa

    table = pa.table({"text": texts, "reject": pa.nulls(len(texts), pa.string())})
    batches = [table.slice(i, BATCH_SIZE) for i in range(0, table.num_rows, BATCH_SIZE)]
    out = {}
    for name, stage in stages().items():
        if name != "identity":
            stage(batches[0])  # loads a model once, as a Ray worker does
            out[name] = _timed(lambda _, stage=stage: [stage(b) for b in batches], texts, mb)[0]
    return out


def _timed(fn, texts: list[str], mb: float) -> tuple[float, object]:
    """(best MB/s of REPEAT runs, the result)."""
    seconds = float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        result = fn(texts)
        seconds = min(seconds, time.perf_counter() - start)
    return round(mb / seconds, 2), result


def compare_language_id(texts: list[str], mb: float) -> dict:
    """Accuracy on the test sample and MB/s on one CPU of each language-ID library that is installed."""
    from raylm.pipelines.langid import LangidModel
    from tests.pipelines.test_langid import sample_accuracy

    models = {"raylm LangidModel (batched langid.py)": LangidModel()}
    from langid.langid import LanguageIdentifier, model

    ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    models["langid.py 1.1.6 classify"] = _PerText(lambda t: ident.classify(t))
    try:
        from lingua import LanguageDetectorBuilder

        for mode in ("low", "high"):
            builder = LanguageDetectorBuilder.from_all_languages()
            detector = (builder.with_low_accuracy_mode() if mode == "low" else builder).build()
            models[f"lingua {mode} accuracy"] = _PerText(lambda t, d=detector: _lingua(d, t))
    except ImportError:
        pass
    out = {}
    for name, m in models.items():
        accuracy, misses = sample_accuracy(m)
        rate, _ = _timed(lambda ts, m=m: m.classify([t[:2000] for t in ts]), texts, mb)
        out[name] = {"accuracy": round(accuracy, 4), "misses": len(misses), "mb_per_s_1cpu": rate}
    return out


class _PerText:
    """A one-text-at-a-time classifier in the batch interface of raylm's models."""

    def __init__(self, classify_one):
        self.classify_one = classify_one

    def classify(self, texts):
        pairs = [self.classify_one(t) for t in texts]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _lingua(detector, text: str) -> tuple[str, float]:
    top = detector.compute_language_confidence_values(text)[0]
    return top.language.iso_code_639_1.name.lower(), top.value


def compare_matchers(texts: list[str], mb: float) -> dict:
    """MB/s on one CPU of counting the shipped word lists' matches, three ways (same counts asserted)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from raylm.pipelines.config import SensitiveConfig
    from raylm.pipelines.sensitive import COLUMN, SensitiveContent, load_categories

    words = [w for c in load_categories(SensitiveConfig()) for w in _entries_of(c)]
    alternation = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    one_regex = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)
    out = {"python re alternation": _timed(lambda ts: sum(len(one_regex.findall(t)) for t in ts), texts, mb)}
    try:
        import ahocorasick

        automaton = ahocorasick.Automaton()
        for w in words:
            automaton.add_word(w.lower(), len(w))
        automaton.make_automaton()
        out["pyahocorasick"] = _timed(lambda ts: sum(_aho_count(automaton, t) for t in ts), texts, mb)
    except ImportError:
        pass
    re2 = "(?i)" + "|".join(rf"\b{re.escape(w)}\b" for w in words)
    array = pa.array(texts)
    out["RE2 alternation (pyarrow)"] = _timed(
        lambda _: pc.sum(pc.count_substring_regex(array, re2)).as_py(), texts, mb
    )
    table = pa.table({"text": array, "reject": pa.nulls(len(texts), pa.string())})
    stage = SensitiveContent(SensitiveConfig())
    out["raylm SensitiveContent (RE2 prefilter + exact, words and patterns)"] = _timed(
        lambda _: sum(sum(m.values()) for m in stage(table).column(COLUMN).to_pylist()), texts, mb
    )
    return {name: {"mb_per_s_1cpu": rate, "result": result} for name, (rate, result) in out.items()}


def _entries_of(category) -> list[str]:
    from importlib.resources import files

    text = (
        files("raylm.pipelines")
        .joinpath("data")
        .joinpath("sensitive")
        .joinpath(f"{category.name}.txt")
        .read_text()
    )
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _aho_count(automaton, text: str) -> int:
    low, n = text.lower(), 0
    for end, length in automaton.iter(low):
        start = end - length + 1
        before = start == 0 or not (low[start - 1].isalnum() or low[start - 1] == "_")
        after = end + 1 == len(low) or not (low[end + 1].isalnum() or low[end + 1] == "_")
        n += before and after
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of text")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compare-mb", type=float, default=2.0, help="MB for the one-CPU library comparison")
    parser.add_argument("--ray-side", type=int, help=argparse.SUPPRESS)  # internal: one CPU count
    parser.add_argument("--no-reservation", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    path = WORK / f"corpus-{args.mb:g}mb.parquet"
    if args.ray_side:
        print(json.dumps(run_ray(path, args.ray_side, reservation=not args.no_reservation)))
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    WORK.mkdir(parents=True, exist_ok=True)
    tiny_classifier()
    texts = make_corpus(args.mb)
    if not path.exists():
        pq.write_table(pa.table({"text": texts, "reject": pa.nulls(len(texts), pa.string())}), path)
    ray_runs = {}
    sides = [(cpus, "") for cpus in args.cpus] + [(max(args.cpus), "--no-reservation")]
    for cpus, flag in sides:
        name = f"{cpus}_cpu" + ("_no_reservation" if flag else "")
        cmd = [sys.executable, __file__, "--mb", str(args.mb), "--ray-side", str(cpus), *filter(None, [flag])]
        done = subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
        )
        ray_runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}:", json.dumps(ray_runs[name]["stages"]), flush=True)

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the comparisons: one CPU
    sample, size = [], 0
    for t in texts:
        if size > args.compare_mb * 1e6:
            break
        sample.append(t)
        size += len(t.encode())
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPUs",
        "corpus": {"documents": len(texts), "text_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2)},
        "ray_data": ray_runs,
        "classifier_note": (
            "the classifier rows use a ~33k-parameter BERT (1 layer, hidden 32, max_length 128) trained by "
            "the benchmark: they measure the stage's machinery (tokenizing, padding to a fixed shape, the "
            "actor pool, actor start-up), not a real model; a real classifier costs orders of magnitude "
            "more per document and runs with num_gpus on a GPU cluster"
        ),
        "in_process_1cpu_mb_per_s": in_process(sample, size / 1e6),
        "language_id_1cpu": compare_language_id(sample, size / 1e6),
        "matchers_1cpu": compare_matchers(sample, size / 1e6),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("in_process_1cpu_mb_per_s", "language_id_1cpu", "matchers_1cpu")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
