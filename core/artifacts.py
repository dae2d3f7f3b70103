"""The folders between stages: where each file lives, how to check one, and its manifest.

Producers (pipelines/, training/, serving/), consumers, tests and benchmarks all use these classes, so a
layout path is spelled here and nowhere else. Each class wraps the folder's root (a local path or an
s3:// / gs:// URI) and names its parts; `validate()` raises InputError naming what is missing.

    run_dir/                      RunDir
      curated/                    CuratedDir  (raylm curate)
        shards/{split}-NNNNN.bin + {split}.index.json (token shards, see CuratedDir), tokenizer/, docs/,
        dedup/clusters.parquet, rejects/, report.html + report.png, manifest.json
      train/                      TrainDir    (raylm train)
        checkpoints/, export/ (ExportDir), metrics.jsonl, loss_curve.png, probe_logits.safetensors,
        manifest.json
      tune/                       TuneDir     (raylm tune)
        experiment/ (Ray Tune's), trials/<trial_id>/ (a TrainDir each), adapters/NN-<trial_id>/,
        best_adapter/, trials.csv, best_config.yaml, lr_vs_loss.png, learning_curves.png, manifest.json
      serve/serve_config.yaml     (raylm serve)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from raylm.core import lineage, storage
from raylm.core.errors import InputError
from raylm.core.storage import join

# The `kind` of each stage's output (in its manifest and its core/outputs.py marker).
CURATED, TRAIN, TUNE, SERVE, RUN = "curated", "train", "tune", "serve", "run"
EXPORT_MODEL, EXPORT_ADAPTER = "model", "adapter"
# Token shard splits: pretraining train/eval, and a held-apart part of the corpus for fine-tuning and
# tuning (`data.finetune_fraction`), with its own validation split.
SPLITS = ("train", "eval", "finetune", "finetune_eval")
CLUSTERS_FILE = "clusters.parquet"
# The token shard format; a reader refuses an index of another format rather than misreading it.
TOKEN_FORMAT = "raylm-tokens-1"


def token_dtype(max_token_id: int) -> str:
    """The narrowest dtype that holds every id up to max_token_id: uint16 for vocabularies < 65536
    (as nanoGPT and Megatron store them), uint32 otherwise. Little-endian on disk, whatever the host."""
    return "uint16" if max_token_id < 2**16 else "uint32"


@dataclass(frozen=True)
class ShardIndex:
    """What a reader needs to find any row of a split without reading token data: shards/<split>.index.json.
    Each shard is raw little-endian token ids, row-major [rows, seq_len], of its own dtype."""

    seq_len: int
    shards: list[dict[str, Any]]
    """[{"file": "train-00000.bin", "rows": n, "dtype": "uint16" | "uint32"}, ...] in row order."""

    @property
    def rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"format": TOKEN_FORMAT, "seq_len": self.seq_len, "rows": self.rows, "shards": self.shards}

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> ShardIndex:
        if doc.get("format") != TOKEN_FORMAT:
            raise InputError(f"{where}: token shard format {doc.get('format')!r}, expected {TOKEN_FORMAT!r}")
        return cls(int(doc["seq_len"]), list(doc["shards"]))


@dataclass(frozen=True)
class CuratedDir:
    """The curation output: token shards, tokenizer, kept documents, dedup clusters, rejects."""

    root: str

    @property
    def shards(self) -> str:
        return join(self.root, "shards")

    @property
    def tokenizer(self) -> str:
        return join(self.root, "tokenizer")

    @property
    def docs(self) -> str:
        return join(self.root, "docs")

    @property
    def dedup(self) -> str:
        return join(self.root, "dedup")

    @property
    def clusters(self) -> str:
        return join(self.dedup, CLUSTERS_FILE)

    @property
    def rejects(self) -> str:
        return join(self.root, "rejects")

    @property
    def report(self) -> str:
        """The data report (self-contained HTML: the figure embedded, tables of the numbers)."""
        return join(self.root, "report.html")

    @property
    def report_png(self) -> str:
        """The data report's figure: documents per stage, drops, languages, lengths, scores, clusters."""
        return join(self.root, "report.png")

    @property
    def manifest(self) -> str:
        return join(self.root, storage.MANIFEST)

    @staticmethod
    def shard_name(split: str, index: int) -> str:
        return f"{split}-{index:05d}.bin"

    @staticmethod
    def index_name(split: str) -> str:
        return f"{split}.index.json"

    def shard_index_path(self, split: str) -> str:
        return join(self.shards, self.index_name(split))

    def shard_index(self, split: str) -> ShardIndex | None:
        """The split's shard index; None when the split has no shards. A folder curated in the old
        parquet format is an InputError: loading it whole is what this format exists to avoid."""
        path = self.shard_index_path(split)
        if storage.exists(path):
            return ShardIndex.from_json(storage.read_json(path), path)
        if storage.list_files(self.shards, ".parquet"):
            raise InputError(
                f"curated folder {self.root} holds token shards in the old parquet format "
                "(shards/*.parquet), which training no longer reads: delete the folder and re-run "
                "`raylm curate` to write it in the current format"
            )
        return None

    def shard_files(self, split: str) -> list[str]:
        """The shards of one split, in row order (none when the split has none)."""
        index = self.shard_index(split)
        return [join(self.shards, s["file"]) for s in index.shards] if index else []

    def validate(self, key: str = "train.data_dir", split: str = "train") -> dict[str, Any]:
        """The manifest of a complete curated folder with what training needs (shards of `split`);
        InputError otherwise."""
        if not storage.is_complete(self.root):
            raise InputError(
                f"{key} {self.root} is not a complete curated folder (no {storage.MANIFEST}); "
                "run `raylm curate` first or point it at one"
            )
        manifest = lineage.read_manifest(self.root)
        if manifest.get("kind") != CURATED or "seq_len" not in manifest:
            raise InputError(
                f"{key} {self.root}: manifest.json is not a curated manifest (kind={manifest.get('kind')!r})"
            )
        if not self.shard_files(split):
            hint = (
                " (held-apart splits need data.finetune_fraction > 0)" if split.startswith("finetune") else ""
            )
            raise InputError(f"{key} {self.root} has no shards/{self.index_name(split)}{hint}")
        if not storage.exists(self.tokenizer):
            raise InputError(f"{key} {self.root} has no tokenizer/ folder")
        return manifest


@dataclass(frozen=True)
class ExportDir:
    """A trained model in Hugging Face format (config.json + *.safetensors + tokenizer), or a PEFT adapter
    (adapter_config.json + adapter_model.safetensors)."""

    root: str

    @property
    def manifest(self) -> str:
        return join(self.root, storage.MANIFEST)

    def validate_model(self, key: str = "serve.model") -> None:
        path = self.root
        if not os.path.isdir(path):
            raise InputError(f"model folder {path} does not exist ({key})")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{path} has no config.json: not an HF model folder ({key})")
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):
            raise InputError(f"{path} has no .safetensors weights; raylm loads safetensors only")

    def validate_adapter(self) -> None:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not os.path.isfile(os.path.join(self.root, name)):
                raise InputError(f"adapter folder {self.root} has no {name}")


@dataclass(frozen=True)
class TrainDir:
    """The training output: default checkpoint storage, export, per-step history, loss curve, manifest."""

    root: str

    @property
    def checkpoints(self) -> str:
        return join(self.root, "checkpoints")

    @property
    def export(self) -> ExportDir:
        return ExportDir(join(self.root, "export"))

    @property
    def metrics_jsonl(self) -> str:
        return join(self.root, "metrics.jsonl")

    @property
    def loss_curve(self) -> str:
        return join(self.root, "loss_curve.png")

    @property
    def probe_logits(self) -> str:
        """input_ids and the logits the trained model gave them at the end of training (safetensors), so
        an exported model or adapter can be checked against what training had in memory."""
        return join(self.root, "probe_logits.safetensors")

    @property
    def manifest(self) -> str:
        return join(self.root, storage.MANIFEST)


@dataclass(frozen=True)
class TuneDir:
    """The tuning output: Ray Tune's experiment, one training output per trial, the best adapters."""

    root: str
    EXPERIMENT = "experiment"

    @property
    def experiment(self) -> str:
        """Ray Tune's experiment folder (Tuner storage_path is the root, its name EXPERIMENT)."""
        return join(self.root, self.EXPERIMENT)

    def trial(self, trial_id: str) -> TrainDir:
        return TrainDir(join(self.root, "trials", trial_id))

    @property
    def adapters(self) -> str:
        """The best keep_adapters adapters, best first (NN-<trial_id>/): serve.adapters.dirs takes it."""
        return join(self.root, "adapters")

    @property
    def best_adapter(self) -> ExportDir:
        return ExportDir(join(self.root, "best_adapter"))

    @property
    def trials_csv(self) -> str:
        return join(self.root, "trials.csv")

    @property
    def best_config(self) -> str:
        return join(self.root, "best_config.yaml")

    @property
    def lr_plot(self) -> str:
        return join(self.root, "lr_vs_loss.png")

    @property
    def curves_plot(self) -> str:
        return join(self.root, "learning_curves.png")

    @property
    def manifest(self) -> str:
        return join(self.root, storage.MANIFEST)


@dataclass(frozen=True)
class RunDir:
    """A run's folder: each stage's default output lives in it."""

    root: str

    @property
    def curated(self) -> CuratedDir:
        return CuratedDir(join(self.root, "curated"))

    @property
    def train(self) -> TrainDir:
        return TrainDir(join(self.root, "train"))

    @property
    def tune(self) -> TuneDir:
        return TuneDir(join(self.root, "tune"))

    @property
    def serve(self) -> str:
        return join(self.root, "serve")

    @property
    def serve_config(self) -> str:
        return join(self.serve, "serve_config.yaml")


COMPRESS = "compress"  # the `kind` of the compression output


@dataclass(frozen=True)
class CompressDir:
    """The compression output (raylm compress): one HF model folder per method (`gptq_w4a16/`, `w8a8/`,
    `sparse_2of4/`, ...; each loads with from_pretrained and serves with `serve.model` pointed at it),
    compare.json (the comparison table), manifest.json (parents: the model's and the data's manifests)."""

    root: str

    @classmethod
    def under(cls, run: RunDir) -> CompressDir:
        """The default output of a run."""
        return cls(join(run.root, COMPRESS))

    def method(self, name: str) -> ExportDir:
        return ExportDir(join(self.root, name))

    @property
    def compare_json(self) -> str:
        return join(self.root, "compare.json")

    @property
    def manifest(self) -> str:
        return join(self.root, storage.MANIFEST)
