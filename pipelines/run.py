"""`raylm curate`: corpus files -> clean, deduplicated documents, a tokenizer and packed token shards.

The pipeline is written out in plain sight below: read -> normalize -> scrub PII -> sensitive content ->
language ID -> quality filters -> classifiers -> exact dedup -> near dedup -> split -> tokenizer ->
tokenize -> pack -> shards (sensitive content, language ID and the classifiers only when the recipe has
their sections). Each phase streams through
Ray Data and is materialized once where two consumers need it (kept rows and rejects, say); the driver
only ever sees counts. Output lands atomically (core.storage.staged_output) with manifest.json last.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from raylm.core import console, metrics, outputs, storage
from raylm.core.artifacts import CLUSTERS_FILE, CURATED, SPLITS, CuratedDir
from raylm.core.config import PlatformConfig, dump_config
from raylm.core.errors import InputError
from raylm.core.lineage import fingerprint, read_manifest, write_manifest
from raylm.pipelines import classify, langid, readers, sensitive
from raylm.pipelines.classify import CLASSIFY_REASONS
from raylm.pipelines.config import DataConfig
from raylm.pipelines.dedup.exact import exact_duplicates
from raylm.pipelines.dedup.removal import cluster_table, near_duplicate_ids, without
from raylm.pipelines.filters import FILTER_REASONS, QualityFilter, reason_kind
from raylm.pipelines.langid import LANGUAGE_REASONS, LanguageID
from raylm.pipelines.normalize import NORMALIZE_REASONS, Normalize, ScrubPII
from raylm.pipelines.pack import add_bucket, assign_split, num_buckets, pack_group
from raylm.pipelines.readers import READ_REASONS
from raylm.pipelines.report import write_report
from raylm.pipelines.sensitive import SENSITIVE_REASONS, SensitiveContent
from raylm.pipelines.summary import (
    StageRow,
    classifiers_line,
    languages_line,
    record_stages,
    render_summary,
    sensitive_line,
)
from raylm.pipelines.tokenize import Tokenize, check_tokenizer_dir, load_tokenizer, train_tokenizer
from raylm.pipelines.unique_ids import set_aside_later_claims
from raylm.pipelines.write import write_shards, write_table

log = logging.getLogger("raylm")

# The stages of the fused cleaning pass that reject rows, in order, with the reasons each declares: the
# manifest's drops and the dropped-documents gauge (its `stage` tag) are split by these.
STAGE_REASONS = {
    "read": READ_REASONS,
    "normalize": NORMALIZE_REASONS,
    "sensitive": SENSITIVE_REASONS,
    "language": LANGUAGE_REASONS,
    "filters": FILTER_REASONS,
    "classifiers": CLASSIFY_REASONS,
}
STAGE_NAMES = {  # the summary table's and the gauges' names of those stages
    "read": "read",
    "normalize": "normalize",
    "sensitive": "sensitive content",
    "language": "language ID",
    "filters": "quality filters",
    "classifiers": "classifiers",
}


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now


def preflight(cfg: PlatformConfig) -> None:
    """Checks that need no Ray, called by the CLI before Ray starts: the inputs exist, a given tokenizer
    loads, and the output folder may be written (see core/outputs.py)."""
    readers.find_inputs(cfg.data.sources)
    if cfg.data.tokenizer.path:
        check_tokenizer_dir(cfg.data.tokenizer.path, "data.tokenizer.path")
    if _on(cfg.data.sensitive):
        sensitive.load_categories(cfg.data.sensitive)  # the lists exist and the patterns compile
    model = cfg.data.language.model_path if _on(cfg.data.language) else None
    if model and not storage.exists(model):
        raise InputError(f"data.language.model_path: file not found: {model}")
    classify.preflight(cfg.data.classifiers)  # the models exist and have the labels the thresholds name
    check_output(cfg)


def _on(section) -> bool:
    """An optional stage runs when the recipe has its section and does not switch it off."""
    return section is not None and section.enabled


def check_output(cfg: PlatformConfig) -> None:
    """data.output may be written: absent, empty or raylm's curated output, and apart from the inputs."""
    data = cfg.data
    inputs = {f"data.sources[{i}].path": s.path for i, s in enumerate(data.sources)}
    if data.tokenizer.path:
        inputs["data.tokenizer.path"] = data.tokenizer.path
    outputs.check_stage_output("data.output", data.output, CURATED, cfg.run_dir, inputs)


def _keep_rejected(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_valid(t.column("reject")))


def _keep_clean(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t.column("reject"))).drop_columns(["reject"])


def _block_counts(t: pa.Table, scored: list[classify.Plan]) -> pa.Table:
    """A few rows of one block: (reason, reject kind, rows; '' for rows that go on), (language, label,
    documents), (sensitive, category.count, n) and (classifier, name.scored / column.sum, n) when those
    stages ran. Rows read, drops by reason, rows kept and the stages' own counts all come from one pass
    over these rows (n is a float64 for the classifiers' score sums; counts stay exact below 2**53)."""
    counted = pc.value_counts(pc.fill_null(reason_kind(t.column("reject")), ""))
    counts = {
        ("reason", k): n
        for k, n in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())
    }
    if langid.LABEL in t.column_names:
        counts |= {("language", k): n for k, n in langid.block_counts(t).items()}
    if sensitive.COLUMN in t.column_names:
        counts |= {("sensitive", k): n for k, n in sensitive.block_counts(t).items()}
    counts |= {("classifier", k): n for k, n in classify.block_counts(t, scored).items()}
    groups, keys = zip(*counts) if counts else ((), ())
    return pa.table(
        {"group": list(groups), "key": list(keys), "n": pa.array(list(counts.values()), pa.float64())}
    )


def _tally_cleaned(cleaned, tally: Tally, scored: list[classify.Plan]) -> None:
    """Rows read, drops by reason, rows kept, languages, sensitive matches and classifier scores of the
    cleaned rows."""
    totals: dict[str, Counter] = {k: Counter() for k in ("reason", "language", "sensitive", "classifier")}
    blocks = cleaned.map_batches(_block_counts, fn_kwargs={"scored": scored}, batch_format="pyarrow")
    for row in blocks.take_all():
        n = row["n"]
        totals[row["group"]][row["key"]] += n if row["group"] == "classifier" else int(n)
    reasons = totals["reason"]
    tally.after_cleaning = reasons.pop("", 0)
    tally.rows_read = sum(reasons.values()) + tally.after_cleaning
    tally.drops = dict(sorted(reasons.items()))
    tally.languages = dict(totals["language"].most_common())
    tally.sensitive = dict(totals["sensitive"])
    tally.classifiers = dict(totals["classifier"])


def _clean(data: DataConfig, files: list[readers.InputFile]):
    """read -> normalize -> PII -> sensitive content -> language ID -> quality filters -> classifiers,
    one streaming pass; rejected rows keep a reason. Cheapest first (benchmarks/curate_stages.py, MB/s on
    one CPU: PII ~140, sensitive content ~130, normalize ~28, language ID ~6, quality filters ~3, a real
    classifier model far less), so the costly stages see fewer rows; language ID also goes before the
    quality rules, whose stop-word rule is English-only, so a document in another language is dropped
    for its language. The tasks up to the quality filters fuse into one; each classifier is an actor
    pool that the blocks stream on to (classify.py), with no materialization in between."""
    # Each stage takes the reader's tables of data.batch_size rows as its batches (batch_size=None):
    # readers.read_corpus says why the batch size belongs to the read.
    ds = readers.read_corpus(files, rows_per_batch=data.batch_size)
    ds = ds.map_batches(Normalize(data.normalize), batch_format="pyarrow", batch_size=None)
    if data.pii.enabled:
        ds = ds.map_batches(ScrubPII(data.pii), batch_format="pyarrow", batch_size=None)
    if _on(data.sensitive):
        ds = ds.map_batches(SensitiveContent(data.sensitive), batch_format="pyarrow", batch_size=None)
    if _on(data.language):
        ds = ds.map_batches(LanguageID(data.language), batch_format="pyarrow", batch_size=None)
    ds = ds.map_batches(QualityFilter(data.filters), batch_format="pyarrow", batch_size=None)
    return classify.score(ds, data.classifiers)


def _near_clusters(survivors, data: DataConfig):
    if data.near_dedup.enabled:
        from raylm.pipelines.dedup.near import near_duplicate_clusters

        return near_duplicate_clusters(survivors.select_columns(["id", "text"]), data.near_dedup)
    return survivors.map_batches(
        lambda t: pa.table({"id": t["id"], "cluster_id": t["id"], "kept": pa.array([True] * t.num_rows)}),
        batch_format="pyarrow",
    )


def _train_or_load_tokenizer(data: DataConfig, docs, n_docs: int, out_dir: str) -> int:
    import ray

    if data.tokenizer.path:
        with storage.local_copy(data.tokenizer.path) as local:
            tok = load_tokenizer(local)
        with tempfile.TemporaryDirectory() as local:
            tok.save_pretrained(local)
            storage.upload_dir(local, out_dir)
        return len(tok)

    @ray.remote(num_cpus=1)
    def train(ds, limit: int, vocab: int, min_freq: int, out: str) -> int:
        console.quiet_worker_dataset(ds)

        def texts():
            seen = 0
            for batch in ds.iter_batches(batch_size=1024, batch_format="pyarrow"):
                for text in batch.column("text").to_pylist():
                    if seen >= limit:
                        return
                    seen += 1
                    yield text

        tok = train_tokenizer(texts(), vocab_size=vocab, min_frequency=min_freq)
        with tempfile.TemporaryDirectory() as local:
            tok.save_pretrained(local)
            storage.upload_dir(local, out)  # works for s3:// and gs:// outputs too
        return len(tok)

    # Training the BPE merges is one process by nature; it runs in a Ray task next to the data, and
    # reads a deterministic subset (documents sorted by id) so the same corpus gives the same tokenizer.
    sample = docs.select_columns(["id", "text"]).sort("id")
    t = data.tokenizer
    return ray.get(
        train.remote(sample, min(t.max_training_docs, n_docs), t.vocab_size, t.min_frequency, out_dir)
    )


def drops_by_stage(drops: dict[str, int]) -> dict[str, dict[str, int]]:
    """Drops split by the stage that declares their reason (STAGE_REASONS: read, normalize, sensitive,
    language, filters, classifiers; every stage named, {} where none). A reason no stage declares is a
    bug, not a filter drop: it fails the run instead of being miscounted."""
    unknown = set(drops) - set().union(*STAGE_REASONS.values())
    if unknown:
        raise RuntimeError(f"curation bug: reject reasons {sorted(unknown)} are declared by no stage")
    return {
        stage: {k: v for k, v in drops.items() if k in reasons} for stage, reasons in STAGE_REASONS.items()
    }


def check_counts_never_grow(stages: list[tuple[str, int]]) -> None:
    """Each stage passes on at most the documents it received; more means rows were duplicated on the
    way (ids repeated across a join, say), and the output must not be written."""
    for (_, n_before), (stage, n_after) in itertools.pairwise(stages):
        if n_after > n_before:
            raise RuntimeError(f"curation bug: {stage} passed on {n_after} documents but got {n_before}")


def _skipped_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(counts.items()))


def _num_partitions() -> int:
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))


@dataclass
class Tally:
    """What each phase counted, filled in as the run goes; the driver only ever sees these numbers."""

    rows_read: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)  # documents per language label (language ID)
    sensitive: dict[str, int] = field(default_factory=dict)  # "category.matches" etc. (sensitive content)
    # "name.scored", "column.sum", "column.dropped" (classifiers)
    classifiers: dict[str, float] = field(default_factory=dict)
    # Documents the cleaning pass kept, after its last stage: the quality filters, or the classifiers
    # when the recipe has them (the manifest's after_filters counts the quality filters' own output).
    after_cleaning: int = 0
    after_exact_dedup: int = 0
    after_near_dedup: int = 0
    clustered: int = 0
    documents: dict[str, int] = field(default_factory=dict)  # kept documents per split
    tokens: int = 0
    vocab: int = 0
    shards: dict[str, list[dict]] = field(default_factory=dict)


def run(cfg: PlatformConfig) -> dict:
    """Curate cfg.data (Ray is already initialised by the CLI's session); returns the manifest."""
    data, out = cfg.data, cfg.data.output
    check_output(cfg)  # again: run() is also called without the CLI (tests, notebooks)
    if storage.is_complete(out) and outputs.output_kind(out) == CURATED:
        log.info("curated data at %s is complete; nothing to do (delete the folder to curate again)", out)
        return read_manifest(out)

    inputs = readers.find_inputs(data.sources)
    in_bytes = sum(f.size for f in inputs.files)
    log.info("curating %d files (%.1f MB) into %s", len(inputs.files), in_bytes / 1e6, out)
    if inputs.skipped:
        log.info("files not read: %s", _skipped_line(inputs.skipped))
    parts, times, tally = _num_partitions(), Timings(), Tally()

    outputs.claim_run_dir(cfg.run_dir, out)
    with all_cpus_to_each_operator(), outputs.staged_output(out, CURATED) as tmp:
        staging = CuratedDir(tmp)
        final = curate_documents(data, inputs.files, parts, staging, tally, times)
        _tokenize_and_shard(final, data, parts, staging, tally)
        times.lap("tokenize_pack_write")
        counts = _write_manifest(staging, data, inputs, tally, times)

    _record_metrics(cfg.name, counts, tally, times, data)
    print(_summary(counts, times, inputs, data, tally), flush=True)
    log.info("curated data written to %s", out)
    return read_manifest(out)


@contextmanager
def all_cpus_to_each_operator():
    """Ray Data's operator resource reservation (on by default) keeps a share of the CPUs for each
    operator of a pipeline, so curation's cleaning pass, its costliest operator, ran on a part of them
    (benchmarks/curate_files.py: 1.3x faster without it, with the read planned per file). Datasets capture
    the context when they are created: switched off for this run's, restored after. On a terminal the
    run's datasets show one progress bar each, not one more per operator (core/console.py)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before, context.op_resource_reservation_enabled = context.op_resource_reservation_enabled, False
    bars = context.enable_operator_progress_bars
    console.terminal_progress(context)
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = before
        context.enable_operator_progress_bars = bars


def curate_documents(data: DataConfig, files, parts: int, staging: CuratedDir, tally: Tally, times: Timings):
    """read -> normalize -> scrub -> filter -> exact dedup -> near dedup: writes rejects/, dedup/ and docs/
    under `staging`, fills in `tally` and `times`, and returns the kept documents with their split (the
    part of curation that benchmarks/curate.py compares with datatrove)."""
    kept = _read_clean_filter(data, files, parts, staging, tally)
    times.lap("read_clean_filter")
    return _deduplicate(kept, data, parts, staging, tally, times)


def _record_metrics(run_name: str, counts: dict, tally: Tally, times: Timings, data: DataConfig) -> None:
    """The run's tallies as the curation gauges of core/metrics.py (the same numbers as the manifest)."""
    tags = {"run": run_name}
    metrics.record(metrics.CURATE_DOCUMENTS_IN, counts["documents_read"], tags)
    metrics.record(metrics.CURATE_DOCUMENTS_OUT, counts["after_near_dedup"], tags)
    metrics.record(metrics.CURATE_TOKENS, counts["packed_tokens"], tags)
    metrics.record(metrics.CURATE_RUNS, 1, tags)
    record_stages(_stage_rows(counts, times, data), run_name)
    duplicates = counts["after_classifiers"] - counts["after_near_dedup"]
    metrics.record(metrics.CURATE_DUPLICATE_RATIO, duplicates / max(counts["after_classifiers"], 1), tags)
    total_s = max(sum(times.seconds.values()), 1e-9)
    metrics.record(metrics.CURATE_MEGABYTES_PER_SECOND, counts["input_bytes"] / 1e6 / total_s, tags)
    cleaning = {STAGE_NAMES[stage]: drops for stage, drops in drops_by_stage(tally.drops).items()}
    dedup = {
        "exact dedup": {"exact_duplicate": counts["after_classifiers"] - counts["after_exact_dedup"]},
        "near dedup": {"near_duplicate": counts["after_exact_dedup"] - counts["after_near_dedup"]},
    }
    for stage, drops in {**cleaning, **dedup}.items():
        for reason, n in drops.items():
            metrics.record(metrics.CURATE_DROPPED_DOCUMENTS, n, tags | {"stage": stage, "reason": reason})


def _read_clean_filter(data: DataConfig, files, parts: int, staging: CuratedDir, tally: Tally):
    """1. read, normalize, scrub, filter: one streaming pass, materialized for its consumers (the counts,
    the rejects, the kept rows); a later document claiming an earlier one's id is set aside
    (unique_ids.py). Every count comes from one pass that returns a few rows per block."""
    cleaned = _clean(data, files).materialize()
    cleaned = set_aside_later_claims(cleaned, parts).materialize()
    _tally_cleaned(cleaned, tally, classify.plans(data.classifiers))
    rejected = cleaned.map_batches(_keep_rejected, batch_format="pyarrow")
    if not data.write_rejects:
        rejected = rejected.map_batches(_keep_read_rejects, batch_format="pyarrow")
    if any(data.write_rejects or reason in READ_REASONS for reason in tally.drops):
        rejected.write_parquet(staging.rejects)
    if tally.after_cleaning == 0:
        kept_at = outputs.publish_incomplete(
            staging.root, data.output, CURATED, [os.path.basename(staging.rejects)]
        )
        raise InputError(
            f"data.sources: no documents left to curate: {tally.rows_read} rows read, all rejected "
            f"({_skipped_line(tally.drops)}); the rejected rows and their reasons are in "
            f"{CuratedDir(kept_at).rejects}"
        )
    # Not materialized: its one consumer is exact dedup, and filtering materialized blocks is cheap.
    return cleaned.map_batches(_keep_clean, batch_format="pyarrow")


def _keep_read_rejects(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_in(reason_kind(t.column("reject")), pa.array(sorted(READ_REASONS))))


def _deduplicate(kept, data: DataConfig, parts: int, staging: CuratedDir, tally: Tally, times: Timings):
    """2. exact dedup (dedup/exact.py), 3. near dedup (MinHash LSH + connected components on Ray);
    writes dedup/clusters.parquet and docs/, returns the kept documents with their split. Duplicates are
    taken out by id (dedup/removal.py): the documents themselves are never shuffled when they are few."""
    exact_dups = exact_duplicates(kept, parts)
    n_exact = exact_dups.num_rows if isinstance(exact_dups, pa.Table) else exact_dups.count()
    survivors = without(kept, exact_dups, parts)
    tally.after_exact_dedup = tally.after_cleaning - n_exact
    times.lap("exact_dedup")
    near = _near_clusters(survivors, data).materialize()
    tally.clustered = write_table(cluster_table(exact_dups, near, parts), staging.dedup, CLUSTERS_FILE)
    final = without(survivors, near_duplicate_ids(near), parts)
    final = final.map_batches(_with_split, fn_kwargs={"data": data}, batch_format="pyarrow").materialize()
    tally.after_near_dedup = final.count()
    tally.documents = _documents_per_split(final)
    final.write_parquet(staging.docs)
    times.lap("near_dedup_and_docs")
    return final


def _with_split(t: pa.Table, data: DataConfig) -> pa.Table:
    split = assign_split(
        t.column("id"), data.eval_fraction, data.finetune_fraction, data.finetune_eval_fraction
    )
    return t.append_column("split", split)


def _split_sizes(t: pa.Table) -> pa.Table:
    counted = pc.value_counts(t.column("split"))
    return pa.table({"split": counted.field("values"), "n": counted.field("counts")})


def _documents_per_split(final) -> dict[str, int]:
    """Documents per split (every split named, 0 where empty), in one pass that returns a few counts per block."""
    documents = dict.fromkeys(SPLITS, 0)
    for row in final.map_batches(_split_sizes, batch_format="pyarrow").take_all():
        documents[row["split"]] += int(row["n"])
    return documents


def _tokenize_and_shard(final, data: DataConfig, parts: int, staging: CuratedDir, tally: Tally) -> None:
    """4. tokenizer (trained or loaded), 5. tokenize + pack into seq_len rows + balanced shards per split."""
    import ray.data

    tally.vocab = _train_or_load_tokenizer(data, final, tally.after_near_dedup, staging.tokenizer)
    tokenized = final.map_batches(
        Tokenize,
        fn_constructor_kwargs={"tokenizer_dir": staging.tokenizer},
        batch_format="pyarrow",
        batch_size=data.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=parts),
    ).materialize()
    lengths = tokenized.map_batches(
        lambda t: pa.table({"n": pc.list_value_length(t.column("input_ids"))}), batch_format="pyarrow"
    )
    tally.tokens = int(lengths.sum("n") or 0)
    buckets = num_buckets(tally.after_near_dedup)
    packed = (
        tokenized.map_batches(add_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow")
        .groupby("bucket", num_partitions=min(parts, buckets))
        .map_groups(pack_group, fn_kwargs={"seq_len": data.seq_len}, batch_format="pyarrow")
        .sort(["bucket", "seq_index"])
        .materialize()
    )
    for split in SPLITS:
        if tally.documents[split] == 0:  # no documents, no shards; and no Ray Data pass to count nothing
            tally.shards[split] = []
            continue
        part = packed.filter(expr=f"split == '{split}'").select_columns(["input_ids"])
        tally.shards[split] = write_shards(part, staging.shards, split, data.rows_per_shard, tally.vocab)


def _sequences(tally: Tally) -> dict[str, int]:
    return {s: sum(x["rows"] for x in tally.shards.get(s, [])) for s in SPLITS}


def _counts(
    tally: Tally, drops: dict[str, dict], inputs: readers.Inputs, in_bytes: int, seq_len: int
) -> dict:
    """The manifest's counts, after checking that no stage passed on more documents than it got."""
    n_valid = tally.rows_read - sum(drops["read"].values())
    n_normalized = n_valid - sum(drops["normalize"].values())
    n_sensitive = n_normalized - sum(drops["sensitive"].values())
    n_language = n_sensitive - sum(drops["language"].values())
    n_filters = n_language - sum(drops["filters"].values())
    check_counts_never_grow(
        [
            ("rows read", tally.rows_read),
            ("documents read", n_valid),
            ("normalize", n_normalized),
            ("sensitive content", n_sensitive),
            ("language ID", n_language),
            ("quality filters", n_filters),
            ("classifiers", tally.after_cleaning),
            ("exact dedup", tally.after_exact_dedup),
            ("near dedup", tally.after_near_dedup),
        ]
    )
    if tally.clustered != tally.after_cleaning:
        raise RuntimeError(f"{CLUSTERS_FILE} has {tally.clustered} rows for {tally.after_cleaning} documents")
    sequences = _sequences(tally)
    packed_tokens = sum(sequences.values()) * seq_len
    return {
        "files": len(inputs.files),
        "input_bytes": in_bytes,
        "rows_read": tally.rows_read,
        "documents_read": n_valid,
        "after_normalize": n_normalized,
        "after_sensitive": n_sensitive,
        "after_language": n_language,
        "after_filters": n_filters,
        "after_classifiers": tally.after_cleaning,
        "after_exact_dedup": tally.after_exact_dedup,
        "after_near_dedup": tally.after_near_dedup,
        "clustered_documents": tally.clustered,
        "eval_documents": tally.documents["eval"],
        "finetune_documents": tally.documents["finetune"],
        "finetune_eval_documents": tally.documents["finetune_eval"],
        "tokens": tally.tokens,
        "packed_tokens": packed_tokens,
        "tokens_dropped_in_packing": tally.tokens - packed_tokens,
        "sequences": sequences,
    }


def _summary(counts: dict, times: Timings, inputs: readers.Inputs, data: DataConfig, tally: Tally) -> str:
    """The table printed at the end: documents in and out per stage, time and throughput."""
    c, seq_len, vocab = counts, data.seq_len, tally.vocab
    rows = _stage_rows(counts, times, data)
    seqs = c["sequences"]
    return render_summary(rows, sum(times.seconds.values()), c["input_bytes"]) + (
        f"\nfiles not read: {_skipped_line(inputs.skipped) or 'none'}"
        f"{languages_line(tally.languages)}{sensitive_line(_sensitive_block(data, tally))}"
        f"{classifiers_line(_classifiers_block(data, tally))}"
        f"\n{c['tokens']:,} tokens -> {seqs['train']:,} train + {seqs['eval']:,} eval sequences of "
        f"{seq_len} ({c['tokens_dropped_in_packing']:,} tail tokens dropped in packing); vocab {vocab:,}"
        f"{_held_apart_line(c)}"
    )


def _stage_rows(c: dict, times: Timings, data: DataConfig) -> list[StageRow]:
    """Documents in and out of each stage, with the phase timings: the summary table and its gauges
    (the optional stages only when they ran)."""
    t = times.seconds
    optional = [
        StageRow(STAGE_NAMES["sensitive"], c["after_normalize"], c["after_sensitive"]),
        StageRow(STAGE_NAMES["language"], c["after_sensitive"], c["after_language"]),
    ]
    classifiers = [StageRow(STAGE_NAMES["classifiers"], c["after_filters"], c["after_classifiers"])]
    return [
        StageRow("read", c["rows_read"], c["documents_read"], t["read_clean_filter"], c["input_bytes"]),
        StageRow("normalize", c["documents_read"], c["after_normalize"]),
        *(row for row, on in zip(optional, (_on(data.sensitive), _on(data.language))) if on),
        StageRow("quality filters", c["after_language"], c["after_filters"]),
        *(classifiers if data.classifiers else []),
        StageRow("exact dedup", c["after_classifiers"], c["after_exact_dedup"], t["exact_dedup"]),
        StageRow("near dedup", c["after_exact_dedup"], c["after_near_dedup"], t["near_dedup_and_docs"]),
        StageRow("tokenize + pack", c["after_near_dedup"], c["after_near_dedup"], t["tokenize_pack_write"]),
    ]


def _held_apart_line(c: dict) -> str:
    """The documents held apart for fine-tuning, when there are any (data.finetune_fraction > 0)."""
    held = c["finetune_documents"] + c["finetune_eval_documents"]
    if held == 0:
        return ""
    seqs = c["sequences"]
    return (
        f"\nheld apart for fine-tuning: {held:,} documents ({c['finetune_documents']:,} finetune + "
        f"{c['finetune_eval_documents']:,} finetune_eval) -> {seqs['finetune']:,} finetune + "
        f"{seqs['finetune_eval']:,} finetune_eval sequences"
    )


def _sensitive_block(data: DataConfig, tally: Tally) -> dict | None:
    """The manifest's per-category matches, documents and drops, when the stage ran."""
    return sensitive.summarize(tally.sensitive, data.sensitive) if _on(data.sensitive) else None


def _classifiers_block(data: DataConfig, tally: Tally) -> dict | None:
    """The manifest's per-classifier labels, score columns, documents scored and drops, when any ran."""
    return classify.summarize(tally.classifiers, data.classifiers) if data.classifiers else None


def _write_manifest(
    staging: CuratedDir, data: DataConfig, inputs: readers.Inputs, tally: Tally, times: Timings
) -> dict:
    """The data report, then manifest.json, written last (it marks the folder complete); returns its counts."""
    in_bytes = sum(f.size for f in inputs.files)
    drops = drops_by_stage(tally.drops)
    counts = _counts(tally, drops, inputs, in_bytes, data.seq_len)
    total = sum(times.seconds.values())
    fields = dict(
        inputs={
            "fingerprint": fingerprint([(f.path, f.size, f.mtime) for f in inputs.files]),
            "files": len(inputs.files),
            "bytes": in_bytes,
            "skipped_files": dict(sorted(inputs.skipped.items())),
        },
        counts=counts,
        drops=drops,
        language={"documents": tally.languages} if _on(data.language) else None,
        sensitive=_sensitive_block(data, tally),
        classifiers=_classifiers_block(data, tally),
        timings={
            **times.seconds,
            "total": round(total, 3),
            "mb_per_s": round(in_bytes / 1e6 / max(total, 1e-9), 3),
        },
        seq_len=data.seq_len,
        vocab_size=tally.vocab,
        shards=tally.shards,
        dedup={
            "exact_duplicates": tally.after_cleaning - tally.after_exact_dedup,
            "near_duplicates": tally.after_exact_dedup - tally.after_near_dedup,
            **data.near_dedup.model_dump(),
        },
    )
    write_report(staging.root, fields)  # report.html + report.png, before the manifest completes the folder
    write_manifest(staging.root, CURATED, dump_config(data), **fields)
    return counts
