"""`raylm curate`: corpus files -> clean, deduplicated documents, a tokenizer and packed token shards.

The pipeline is written out in plain sight below: read -> normalize -> scrub PII -> quality filters ->
exact dedup -> near dedup -> split -> tokenizer -> tokenize -> pack -> shards. Each phase streams through
Ray Data and is materialized once where two consumers need it (kept rows and rejects, say); the driver
only ever sees counts. Output lands atomically (core.storage.staged_output) with manifest.json last.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from core import outputs, storage
from core.config import PlatformConfig, dump_config
from core.errors import InputError
from core.lineage import fingerprint, read_manifest, write_manifest
from core.metrics import counter, gauge
from pipelines import readers
from pipelines.config import DataConfig
from pipelines.dedup.exact import exact_duplicates
from pipelines.filters import QualityFilter, reason_kind
from pipelines.normalize import NORMALIZE_REASONS, Normalize, ScrubPII
from pipelines.pack import SPLITS, add_bucket, eval_split, num_buckets, pack_group
from pipelines.readers import READ_REASONS
from pipelines.summary import StageRow, render_summary
from pipelines.tokenize import Tokenize, check_tokenizer_dir, load_tokenizer, train_tokenizer
from pipelines.unique_ids import set_aside_later_claims
from pipelines.write import write_shards, write_table

log = logging.getLogger("raylm")

CURATED = "curated"  # the kind of output this stage writes (its manifest's and marker's `kind`)


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
    check_output(cfg)


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


def _with_reason_kind(t: pa.Table) -> pa.Table:
    return t.append_column("reason", reason_kind(t.column("reject")))


def _drops_by_reason(rejected) -> dict[str, int]:
    if rejected.count() == 0:
        return {}
    rows = (
        rejected.map_batches(_with_reason_kind, batch_format="pyarrow").groupby("reason").count().take_all()
    )
    return {r["reason"]: int(r["count()"]) for r in sorted(rows, key=lambda r: r["reason"])}


def _clean(data: DataConfig, files: list[readers.InputFile]):
    """read -> normalize -> PII -> quality filters, one fused streaming pass; rejected rows keep a reason."""
    ds = readers.read_corpus(files)
    ds = ds.map_batches(Normalize(data.normalize), batch_format="pyarrow", batch_size=data.batch_size)
    if data.pii.enabled:
        ds = ds.map_batches(ScrubPII(data.pii), batch_format="pyarrow", batch_size=data.batch_size)
    return ds.map_batches(QualityFilter(data.filters), batch_format="pyarrow", batch_size=data.batch_size)


def _near_clusters(survivors, data: DataConfig):
    if data.near_dedup.enabled:
        from pipelines.dedup.near import near_duplicate_clusters

        return near_duplicate_clusters(survivors.select_columns(["id", "text"]), data.near_dedup)
    return survivors.map_batches(
        lambda t: pa.table({"id": t["id"], "cluster_id": t["id"], "kept": pa.array([True] * t.num_rows)}),
        batch_format="pyarrow",
    )


def _cluster_table(exact_dups, near, parts: int):
    """Every document that reached dedup: near clusters, plus exact duplicates placed in the cluster of
    the document they duplicate (never kept)."""
    if exact_dups.count() == 0:
        return near
    keeper_cluster = near.select_columns(["id", "cluster_id"]).rename_columns({"id": "keep_id"})
    dups = exact_dups.join(keeper_cluster, join_type="inner", num_partitions=parts, on=("keep_id",))
    dups = dups.map_batches(
        lambda t: pa.table(
            {"id": t["id"], "cluster_id": t["cluster_id"], "kept": pa.array([False] * t.num_rows)}
        ),
        batch_format="pyarrow",
    )
    return near.union(dups)


def _train_or_load_tokenizer(data: DataConfig, docs, n_docs: int, out_dir: str) -> int:
    import ray

    if data.tokenizer.path:
        tok = load_tokenizer(storage.local_dir(data.tokenizer.path))
        with tempfile.TemporaryDirectory() as local:
            tok.save_pretrained(local)
            storage.upload_dir(local, out_dir)
        return len(tok)

    @ray.remote(num_cpus=1)
    def train(ds, limit: int, vocab: int, min_freq: int, out: str) -> int:
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


def run(cfg: PlatformConfig) -> dict:
    import ray.data  # Ray itself is initialised by the CLI's session

    data = cfg.data
    out = data.output
    check_output(cfg)  # again: run() is also called without the CLI (tests, notebooks)
    if storage.is_complete(out) and outputs.output_kind(out) == CURATED:
        log.info("curated data at %s is complete; nothing to do (delete the folder to curate again)", out)
        return read_manifest(out)

    inputs = readers.find_inputs(data.sources)
    files = inputs.files
    in_bytes = sum(f.size for f in files)
    log.info("curating %d files (%.1f MB) into %s", len(files), in_bytes / 1e6, out)
    if inputs.skipped:
        log.info("files not read: %s", _skipped_line(inputs.skipped))
    parts = _num_partitions()
    times = Timings()

    outputs.claim_run_dir(cfg.run_dir, out)
    with outputs.staged_output(out, CURATED) as tmp:
        # 1. read, normalize, scrub, filter: one streaming pass, materialized for its two consumers;
        # then a later document claiming an earlier one's id is set aside (pipelines/unique_ids.py).
        cleaned = _clean(data, files).materialize()
        cleaned = set_aside_later_claims(cleaned, parts).materialize()
        rejected = cleaned.map_batches(_keep_rejected, batch_format="pyarrow")
        kept = cleaned.map_batches(_keep_clean, batch_format="pyarrow").materialize()
        n_read = cleaned.count()
        drops = _drops_by_reason(rejected)
        n_kept = kept.count()
        if not data.write_rejects:
            rejected = rejected.map_batches(
                lambda t: t.filter(pc.is_in(reason_kind(t.column("reject")), pa.array(sorted(READ_REASONS)))),
                batch_format="pyarrow",
            )
        if rejected.count():
            rejected.write_parquet(f"{tmp}/rejects")
        times.lap("read_clean_filter")
        if n_kept == 0:
            kept_at = outputs.publish_incomplete(tmp, out, CURATED, ["rejects"])
            raise InputError(
                f"data.sources: no documents left to curate: {n_read} rows read, all rejected "
                f"({_skipped_line(drops)}); the rejected rows and their reasons are in {kept_at}/rejects"
            )

        # 2. exact dedup (one hash shuffle), 3. near dedup (MinHash LSH + connected components on Ray).
        labelled = exact_duplicates(kept, parts).materialize()
        survivors = labelled.filter(expr="id == keep_id").drop_columns(["text_hash", "keep_id"]).materialize()
        exact_dups = labelled.filter(expr="id != keep_id").select_columns(["id", "keep_id"])
        n_exact = survivors.count()
        times.lap("exact_dedup")
        near = _near_clusters(survivors, data).materialize()
        clusters = _cluster_table(exact_dups, near, parts)
        n_clustered = write_table(clusters, f"{tmp}/dedup", "clusters.parquet")
        keep_ids = near.filter(expr="kept").select_columns(["id"])
        final = survivors.join(keep_ids, join_type="inner", num_partitions=parts, on=("id",))
        final = final.map_batches(
            lambda t: t.append_column("split", eval_split(t.column("id"), data.eval_fraction)),
            batch_format="pyarrow",
        ).materialize()
        n_final = final.count()
        final.write_parquet(f"{tmp}/docs")
        times.lap("near_dedup_and_docs")

        # 4. tokenizer, 5. tokenize + pack + shard per split.
        vocab = _train_or_load_tokenizer(data, final, n_final, f"{tmp}/tokenizer")
        times.lap("tokenizer")
        tokenized = final.map_batches(
            Tokenize,
            fn_constructor_kwargs={"tokenizer_dir": f"{tmp}/tokenizer"},
            batch_format="pyarrow",
            batch_size=data.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=parts),
        ).materialize()
        n_tokens = int(
            tokenized.map_batches(
                lambda t: pa.table({"n": pc.list_value_length(t.column("input_ids"))}), batch_format="pyarrow"
            ).sum("n")
            or 0
        )
        buckets = num_buckets(n_final)
        packed = (
            tokenized.map_batches(add_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow")
            .groupby("bucket", num_partitions=min(parts, buckets))
            .map_groups(pack_group, fn_kwargs={"seq_len": data.seq_len}, batch_format="pyarrow")
            .sort(["bucket", "seq_index"])
            .materialize()
        )
        shards = {}
        for split in SPLITS:
            part = packed.filter(expr=f"split == '{split}'").select_columns(["input_ids"])
            shards[split] = write_shards(part, f"{tmp}/shards", split, data.rows_per_shard)
        times.lap("tokenize_pack_write")

        sequences = {s: sum(x["rows"] for x in shards[s]) for s in SPLITS}
        packed_tokens = sum(sequences.values()) * data.seq_len
        read_drops = {k: v for k, v in drops.items() if k in READ_REASONS}
        norm_drops = {k: v for k, v in drops.items() if k in NORMALIZE_REASONS}
        filter_drops = {k: v for k, v in drops.items() if k not in READ_REASONS | NORMALIZE_REASONS}
        n_valid = n_read - sum(read_drops.values())
        n_normalized = n_valid - sum(norm_drops.values())
        check_counts_never_grow(
            [
                ("rows read", n_read),
                ("documents read", n_valid),
                ("normalize", n_normalized),
                ("quality filters", n_kept),
                ("exact dedup", n_exact),
                ("near dedup", n_final),
            ]
        )
        if n_clustered != n_kept:
            raise RuntimeError(f"dedup/clusters.parquet has {n_clustered} rows for {n_kept} documents")
        counts = {
            "files": len(files),
            "input_bytes": in_bytes,
            "rows_read": n_read,
            "documents_read": n_valid,
            "after_normalize": n_normalized,
            "after_filters": n_kept,
            "after_exact_dedup": n_exact,
            "after_near_dedup": n_final,
            "clustered_documents": n_clustered,
            "eval_documents": final.filter(expr="split == 'eval'").count(),
            "tokens": n_tokens,
            "packed_tokens": packed_tokens,
            "tokens_dropped_in_packing": n_tokens - packed_tokens,
            "sequences": sequences,
        }
        stage_rows = [
            StageRow("read", n_read, n_valid, times.seconds["read_clean_filter"], in_bytes),
            StageRow("normalize", n_valid, n_normalized),
            StageRow("quality filters", n_normalized, n_kept),
            StageRow("exact dedup", n_kept, n_exact, times.seconds["exact_dedup"]),
            StageRow("near dedup", n_exact, n_final, times.seconds["near_dedup_and_docs"]),
            StageRow(
                "tokenize + pack",
                n_final,
                n_final,
                times.seconds["tokenizer"] + times.seconds["tokenize_pack_write"],
            ),
        ]
        total = sum(times.seconds.values())
        summary = render_summary(stage_rows, total, in_bytes) + (
            f"\nfiles not read: {_skipped_line(inputs.skipped) or 'none'}"
            f"\n{n_tokens:,} tokens -> {sequences['train']:,} train + {sequences['eval']:,} eval sequences of "
            f"{data.seq_len} ({n_tokens - packed_tokens:,} tail tokens dropped in packing); vocab {vocab:,}"
        )
        write_manifest(
            tmp,
            CURATED,
            dump_config(data),
            inputs={
                "fingerprint": fingerprint([(f.path, f.size, f.mtime) for f in files]),
                "files": len(files),
                "bytes": in_bytes,
                "skipped_files": dict(sorted(inputs.skipped.items())),
            },
            counts=counts,
            drops={"read": read_drops, "normalize": norm_drops, "filters": filter_drops},
            timings={
                **times.seconds,
                "total": round(total, 3),
                "mb_per_s": round(in_bytes / 1e6 / max(total, 1e-9), 3),
            },
            seq_len=data.seq_len,
            vocab_size=vocab,
            shards=shards,
            dedup={
                "exact_duplicates": n_kept - n_exact,
                "near_duplicates": n_exact - n_final,
                **data.near_dedup.model_dump(),
            },
        )

    for name, value in (("documents_in", n_valid), ("documents_out", n_final), ("tokens", packed_tokens)):
        gauge(f"curate_{name}", value, {"run": cfg.name})
    counter("curate_runs_total", 1, {"run": cfg.name})
    print(summary, flush=True)
    log.info("curated data written to %s", out)
    return read_manifest(out)
