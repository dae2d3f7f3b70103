"""Model-based scoring: a user's local text classifiers run over the documents as Ray Data batch inference
(`data.classifiers`), and the recipe's thresholds on their scores reject documents.

Each classifier is one `map_batches` over an actor pool (`concurrency` actors, `num_gpus` / `num_cpus`
each): an actor loads the model once, in `__init__`, and scores a batch per call. Two kinds:
- hf: a sequence-classification model saved with save_pretrained, loaded with
  AutoModelForSequenceClassification + AutoTokenizer from safetensors only (a pickled checkpoint can run
  code when loaded); softmax over the labels, or sigmoid per label for a multi-label model.
- fasttext: a supervised fastText model (.bin); its probabilities per label.
Every document the stage scores gets one float32 column per label, `<name>_<label>` (the label in
lowercase with anything but letters, digits and _ made _); rows an earlier stage rejected are not scored
(their columns are null) and cost the model nothing.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.core import storage
from raylm.core.errors import ConfigError, RaylmError
from raylm.pipelines import langid, sensitive
from raylm.pipelines.config import ClassifierConfig

# Reject reasons this stage emits.
MIN_SCORE = "classifier_min_score"  # "classifier_min_score[quality_hq]: 0.1234 < 0.5"
MAX_SCORE = "classifier_max_score"  # "classifier_max_score[toxicity_toxic]: 0.9100 > 0.2"
CLASSIFY_REASONS = frozenset({MIN_SCORE, MAX_SCORE})
# Columns other stages write: a score column must not take their name.
TAKEN_COLUMNS = frozenset({"id", "text", "reject", "source", "pos", "split", langid.LABEL, langid.SCORE})
TAKEN_COLUMNS |= {sensitive.COLUMN}
FASTTEXT_PREFIX = "__label__"


def column_label(label: str) -> str:
    """'High-Quality' -> 'high_quality': the label as it ends a column name."""
    return re.sub(r"[^a-z0-9_]+", "_", label.lower()).strip("_")


@dataclass(frozen=True)
class Plan:
    """What one classifier writes and checks, worked out on the driver from the model's labels."""

    name: str
    labels: tuple[str, ...]  # the model's labels, in the order of its outputs
    columns: tuple[str, ...]  # <name>_<label>, one per label
    limits: tuple[tuple[int, str, float], ...]  # (label index, MIN_SCORE | MAX_SCORE, value), recipe order


@functools.cache
def model_labels(kind: str, path: str) -> tuple[str, ...]:
    """The labels of a model, in the order of its outputs: an HF model's id2label (config.json), a
    fastText model's labels without __label__."""
    if kind == "fasttext":
        with storage.local_file(path) as local:
            return tuple(label.removeprefix(FASTTEXT_PREFIX) for label in _load_fasttext(local).get_labels())
    config = storage.read_json(storage.join(path, "config.json"))
    id2label = config.get("id2label") or {i: f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    return tuple(str(label) for _, label in sorted(id2label.items(), key=lambda kv: int(kv[0])))


def check_model_files(cfg: ClassifierConfig, key: str) -> None:
    """The model is where the recipe says, and an HF folder has its config and safetensors weights."""
    if not storage.exists(cfg.path):
        raise ConfigError(f"{key}.path: not found: {cfg.path}")
    if cfg.kind == "fasttext":
        return
    if not storage.exists(storage.join(cfg.path, "config.json")):
        raise ConfigError(f"{key}.path: no config.json in {cfg.path} (save the model with save_pretrained)")
    if not storage.list_files(cfg.path, ".safetensors"):
        raise ConfigError(
            f"{key}.path: no *.safetensors weights in {cfg.path}; raylm does not load pickled checkpoints "
            "(pytorch_model.bin): save the model with save_pretrained(path, safe_serialization=True)"
        )


def plan(name: str, cfg: ClassifierConfig, key: str) -> Plan:
    """The classifier's columns and thresholds; a label the model does not have is a ConfigError."""
    try:
        labels = model_labels(cfg.kind, cfg.path)
    except (OSError, ValueError) as exc:  # an unreadable config.json or .bin (JSONDecodeError: ValueError)
        raise ConfigError(f"{key}.path: cannot read the model's labels from {cfg.path}: {exc}") from None
    columns = tuple(f"{name}_{column_label(label)}" for label in labels)
    if len(set(columns)) < len(columns) or any(c == f"{name}_" for c in columns):
        raise ConfigError(f"{key}.path: labels {list(labels)} do not give distinct column names: {columns}")
    index = {label: i for i, label in enumerate(labels)} | {column_label(x): i for i, x in enumerate(labels)}
    limits = []
    for field, kind in (("min_score", MIN_SCORE), ("max_score", MAX_SCORE)):
        for label, value in getattr(cfg, field).items():
            if label not in index:
                raise ConfigError(
                    f"{key}.{field}: the model has no label '{label}' (its labels: {', '.join(labels)})"
                )
            limits.append((index[label], kind, value))
    return Plan(name, labels, columns, tuple(limits))


def plans(classifiers: dict[str, ClassifierConfig]) -> list[Plan]:
    """Every classifier's plan, in recipe order, checking that its model files are there and that no two
    write the same column (or one of another stage); raises ConfigError naming the key."""
    for name, cfg in classifiers.items():
        check_model_files(cfg, f"data.classifiers.{name}")
    out = [plan(name, cfg, f"data.classifiers.{name}") for name, cfg in classifiers.items()]
    seen: set[str] = set(TAKEN_COLUMNS)
    for p in out:
        if clash := seen & set(p.columns):
            raise ConfigError(f"data.classifiers.{p.name}: its columns {sorted(clash)} are taken")
        seen |= set(p.columns)
    return out


def preflight(classifiers: dict[str, ClassifierConfig]) -> None:
    """Before Ray starts: the models exist, load their labels, and the thresholds name real labels."""
    plans(classifiers)


def _load_fasttext(path: str):
    import fasttext

    return fasttext.load_model(path)


class HFScorer:
    """An HF sequence-classification model on the actor's device: label probabilities per text."""

    def __init__(self, name: str, cfg: ClassifierConfig, n_labels: int):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if cfg.num_gpus > 0 and not torch.cuda.is_available():
            raise RaylmError(f"classifier {name}: num_gpus is {cfg.num_gpus} but torch sees no GPU")
        self.device = "cuda" if cfg.num_gpus > 0 else "cpu"
        remote = cfg.trust_remote_code
        with storage.local_copy(cfg.path) as local:
            self.tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=remote)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                local, use_safetensors=True, trust_remote_code=remote
            )
        self.model.to(self.device).eval()
        if self.model.config.num_labels != n_labels:
            raise RaylmError(f"classifier {name}: {self.model.config.num_labels} outputs, {n_labels} labels")
        if self.tokenizer.pad_token is None:  # decoder tokenizers often have none; batches need one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # decoder heads read the last token that is not padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.inputs = set(inspect.signature(self.model.forward).parameters)  # Llama takes no token_type_ids
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        positions = getattr(self.model.config, "max_position_embeddings", None) or cfg.max_length
        self.max_length = min(cfg.max_length, positions, self.tokenizer.model_max_length)
        self.rows = cfg.batch_size
        self.invariant = cfg.batch_invariant

    def scores(self, texts: list[str]) -> np.ndarray:
        if not self.invariant:
            return self._probabilities(texts, padding=True)
        # Matrix products of other shapes sum in another order (results differ by ~1e-8), so every call
        # gets one shape: `rows` texts (empty ones fill a short batch), each padded to max_length.
        chunks = [texts[i : i + self.rows] for i in range(0, len(texts), self.rows)]
        return np.concatenate(
            [
                self._probabilities(c + [""] * (self.rows - len(c)), padding="max_length")[: len(c)]
                for c in chunks
            ]
        )

    def _probabilities(self, texts: list[str], padding: bool | str) -> np.ndarray:
        import torch

        encoded = self.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        encoded = {k: v.to(self.device) for k, v in encoded.items() if k in self.inputs}
        with torch.inference_mode():
            logits = self.model(**encoded).logits.float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return probs.cpu().numpy()


class FastTextScorer:
    """A supervised fastText model: the probability of each of its labels per text."""

    def __init__(self, cfg: ClassifierConfig, labels: tuple[str, ...]):
        with storage.local_file(cfg.path) as local:
            self.model = _load_fasttext(local)
        self.index = {FASTTEXT_PREFIX + label: i for i, label in enumerate(labels)}

    def scores(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.index)), np.float32)
        for row, text in enumerate(texts):
            # One line per prediction; k=-1: every label. The per-text call, because fasttext 0.9's list
            # form (multilinePredict) returns the top probability for every label when k > 1.
            for prob, label in self.model.f.predict(text.replace("\n", " ") + "\n", -1, 0.0, "replace"):
                out[row, self.index[label]] = min(prob, 1.0)
        return out


class ScoreDocuments:
    """Ray Data stage on an actor pool: scores the rows not yet rejected, writes a column per label and
    rejects the rows outside the recipe's thresholds."""

    def __init__(self, cfg: ClassifierConfig, plan: Plan):
        self.plan, self.max_chars = plan, cfg.max_chars
        if cfg.kind == "hf":
            self.model = HFScorer(plan.name, cfg, len(plan.labels))
        else:
            self.model = FastTextScorer(cfg, plan.labels)

    def verdict(self, scores: np.ndarray) -> str | None:
        """The first threshold a document's scores fail, as its reject reason."""
        for i, kind, value in self.plan.limits:
            column, score = self.plan.columns[i], float(scores[i])
            if kind == MIN_SCORE and score < value:
                return f"{MIN_SCORE}[{column}]: {score:.4f} < {value}"
            if kind == MAX_SCORE and score > value:
                return f"{MAX_SCORE}[{column}]: {score:.4f} > {value}"
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        alive_mask = pc.is_null(batch.column("reject")).to_numpy(zero_copy_only=False)
        alive = np.flatnonzero(alive_mask)
        texts = [(t or "")[: self.max_chars] for t in batch.column("text").take(alive).to_pylist()]
        scores = self.model.scores(texts) if texts else np.zeros((0, len(self.plan.labels)), np.float32)
        reject = batch.column("reject").to_pylist()
        for row, row_scores in zip(alive.tolist(), scores):
            reject[row] = self.verdict(row_scores)
        batch = batch.set_column(
            batch.schema.get_field_index("reject"), "reject", pa.array(reject, pa.string())
        )
        for i, column in enumerate(self.plan.columns):
            values = np.zeros(batch.num_rows, np.float32)
            values[alive] = scores[:, i]
            batch = batch.append_column(column, pa.array(values, pa.float32(), mask=~alive_mask))
        return batch


def score(ds, classifiers: dict[str, ClassifierConfig]):
    """The classifiers' passes over `ds`, in recipe order: one actor pool each, streaming."""
    import ray.data

    for cfg, p in zip(classifiers.values(), plans(classifiers)):
        ds = ds.map_batches(
            ScoreDocuments,
            fn_constructor_kwargs={"cfg": cfg, "plan": p},
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            udf_modifying_row_count=False,
            # No constraint, but remote args that differ from the cleaning tasks': Ray Data fuses a task
            # map into an actor map of the same resources, which would run read..quality filters in the
            # `concurrency` actors instead of on every CPU (ray-project/ray#54433).
            label_selector={},
        )
    return ds


def block_counts(t: pa.Table, scored: list[Plan]) -> dict[str, float]:
    """One block's '<name>.scored' documents, '<column>.sum' of scores and '<column>.dropped' rejects."""
    counts: dict[str, float] = {}
    reject = t.column("reject")
    for p in scored:
        counts[f"{p.name}.scored"] = len(t) - t.column(p.columns[0]).null_count
        for column in p.columns:
            counts[f"{column}.sum"] = pc.sum(t.column(column)).as_py() or 0.0
        for i in {i for i, _, _ in p.limits}:
            column = p.columns[i]
            dropped = [pc.starts_with(reject, f"{kind}[{column}]:") for kind in sorted(CLASSIFY_REASONS)]
            counts[f"{column}.dropped"] = pc.sum(pc.or_(*dropped)).as_py() or 0
    return counts


def summarize(totals: dict[str, float], classifiers: dict[str, ClassifierConfig]) -> dict[str, dict]:
    """The manifest's `classifiers` block: per classifier its model, labels, score columns (the report
    draws a histogram of each from docs/), documents scored, mean score per column and drops."""
    out = {}
    for cfg, p in zip(classifiers.values(), plans(classifiers)):
        n = int(totals.get(f"{p.name}.scored", 0))
        out[p.name] = {
            "kind": cfg.kind,
            "path": cfg.path,
            "labels": list(p.labels),
            "columns": list(p.columns),
            "documents_scored": n,
            "mean": {c: round(totals.get(f"{c}.sum", 0.0) / n, 4) if n else None for c in p.columns},
            "drops": {p.columns[i]: int(totals.get(f"{p.columns[i]}.dropped", 0)) for i, _, _ in p.limits},
        }
    return out
