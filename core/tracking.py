"""Experiment tracking: every train and tune stage (and a sweep's trials) recorded as MLflow runs.

One run per stage in the experiment named after the recipe (`tracking.experiment`): params are the
stage's resolved config flattened to dotted keys, metrics the per-step history and the manifest's final
figures, artifacts the manifest and plots; tags link the runs of one pipeline (run_dir, stage, the
parents' manifests and a fingerprint of each). The store defaults to sqlite:///<run_dir>/mlflow/mlflow.db
(MLflow 3's file store refuses to open unless MLFLOW_ALLOW_FILE_STORE is set), a server from
`tracking.uri` or MLFLOW_TRACKING_URI on a cluster.

Only MlflowClient is used, never mlflow's global "active run": concurrent trials, tests and stages in one
process would otherwise share it. Tracking never stops a run: the first call that fails (a server down,
mlflow not installed) warns once, and that tracker does nothing from then on. A stage calls it as

    with tracking.stage_run(cfg, "train", dump_config(t), [parent manifests], t.output) as tracker:
        ...                              # tracker.ref goes to workers (StepLogger) or Tune (TrialRuns)
        tracker.finish_stage(manifest, "final", t.output, [files], export=...)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from raylm.core import storage

log = logging.getLogger("raylm")

MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.x
TRUNCATED = "...[truncated by raylm]"
PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
METRICS_PER_BATCH = 1000
# An unreachable server must not hold a run for minutes: MLflow's defaults are 7 retries with backoff and
# a 120 s timeout. Set only when the environment does not choose.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
_warned: set[str] = set()  # one warning per store and process


@dataclass(frozen=True)
class RunRef:
    """A run, as plain data: it travels in the loop config to the rank-0 worker and in Tune's callbacks."""

    uri: str
    run_id: str
    experiment_id: str


def local_store(run_dir: str) -> str:
    return "sqlite:///" + os.path.join(run_dir, "mlflow", "mlflow.db")


def resolve_uri(cfg) -> str | None:
    """tracking.uri, else MLFLOW_TRACKING_URI, else a sqlite file in the run folder (None when run_dir is
    remote: sqlite needs a local file)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return None if storage.is_remote(cfg.run_dir) else local_store(cfg.run_dir)


def warn_once(uri: str, what: str, exc: BaseException | str) -> None:
    if uri in _warned:
        return
    _warned.add(uri)
    log.warning("experiment tracking is off for this run: %s failed (%s): %s", what, _safe(uri), exc)


def _safe(uri: str) -> str:
    """The URI without credentials, should an environment variable carry some."""
    scheme, sep, rest = uri.partition("://")
    host, at, tail = rest.partition("@")
    return f"{scheme}{sep}***@{tail}" if at and "/" not in host else uri


def _client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to strings (lists as JSON), each cut to MLflow's param length with a marker."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > MAX_PARAM_CHARS:
            text = text[: MAX_PARAM_CHARS - len(TRUNCATED)] + TRUNCATED
        flat[name] = text
    return flat


def numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a manifest section (bools and strings left out), as dotted metric names."""
    out: dict[str, float] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def manifest_id(uri: str) -> str | None:
    """A fingerprint of a manifest file's content: the same artifact has the same id in every run's tags."""
    try:
        return hashlib.blake2b(storage.read_text(uri).encode(), digest_size=8).hexdigest()
    except (OSError, ValueError):
        return None


def lineage_tags(parents: list[str]) -> dict[str, str]:
    tags = {}
    for i, path in enumerate(parents):
        tags[f"raylm.parent.{i}"] = path
        tags[f"raylm.parent.{i}.id"] = manifest_id(path) or "missing"
    return tags


class Tracker:
    """One MLflow run, or nothing (ref is None): every call is guarded, and the first that fails warns
    once and turns this tracker off, so tracking can never fail the run it records."""

    def __init__(self, ref: RunRef | None = None, client: Any = None):
        self.ref, self._client = ref, client

    @property
    def enabled(self) -> bool:
        return self.ref is not None

    def ref_dict(self) -> dict[str, str] | None:
        return asdict(self.ref) if self.ref else None

    def _call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        if self.ref is None:
            return None
        try:
            if self._client is None:
                self._client = _client(self.ref.uri)
            return getattr(self._client, fn)(*args, **kwargs)
        except Exception as exc:  # tracking is never worth a failed run
            warn_once(self.ref.uri, what, exc)
            self.ref = None
            return None

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._call("logging params", "log_batch", self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.log_metric_list([Metric(k, float(v), now, step) for k, v in values.items()])

    def log_metric_list(self, metrics: list) -> None:
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            self._call(
                "logging metrics", "log_batch", self.run_id, metrics=metrics[i : i + METRICS_PER_BATCH]
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("setting tags", "log_batch", self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_artifact(self, path: str) -> None:
        """A local file (a remote output's files stay where they are; their paths are in the tags)."""
        if not storage.is_remote(path) and os.path.isfile(path):
            self._call("logging an artifact", "log_artifact", self.run_id, path)

    def end(self, status: str) -> None:
        self._call("ending the run", "set_terminated", self.run_id, status)

    @property
    def run_id(self) -> str:
        return self.ref.run_id if self.ref else ""

    def finish_stage(
        self, manifest: dict[str, Any], section: str, output: str, files: list[str], export: str | None = None
    ) -> None:
        """The end of a stage: the manifest's figures (manifest[section]) as `<section>.<key>` metrics, the
        manifest and `files` as artifacts, the export's path and the manifest's fingerprint as tags."""
        self.log_metrics(numbers(manifest.get(section) or {}, f"{section}."))
        manifest_uri = storage.join(output, storage.MANIFEST)
        for path in [manifest_uri, *files]:
            self.log_artifact(path)
        tags = {"raylm.manifest": manifest_uri, "raylm.manifest.id": manifest_id(manifest_uri) or "missing"}
        self.set_tags(tags | ({"raylm.export": export} if export else {}))


def _experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created on first use (another process may create it at the same moment)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _artifact_location(cfg, uri: str) -> str | None:
    """Next to the local store (MLflow would put artifacts under ./mlruns of the working directory);
    a server chooses its own."""
    if uri != local_store(cfg.run_dir):
        return None
    return "file://" + os.path.join(cfg.run_dir, "mlflow", "artifacts")


def _find_run(client: Any, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The newest run with these tags (a resumed sweep continues its run; a restored trial its child)."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], where, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _open(client: Any, experiment_id: str, name: str, tags: dict[str, str], resume: dict) -> tuple[str, bool]:
    """(run id, resumed): the newest run tagged `resume` reopened, else a new run."""
    run_id = _find_run(client, experiment_id, resume) if resume else None
    if run_id is not None:
        client.update_run(run_id, status=RUNNING)
        return run_id, True
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id, False


def start(
    cfg, stage: str, params: dict[str, Any], parents: list[str], output: str, resume: bool = False
) -> Tracker:
    """A run for a stage (or, with resume, the stage's newest run for this output, reopened)."""
    from raylm.core import __version__

    if not cfg.tracking.enabled:
        return Tracker()
    uri = resolve_uri(cfg)
    if uri is None:
        warn_once(cfg.run_dir, "finding a store", "run_dir is remote; set tracking.uri to a tracking server")
        return Tracker()
    key = {"raylm.stage": stage, "raylm.output": output}
    tags = key | {"raylm.recipe": cfg.name, "raylm.run_dir": cfg.run_dir, "raylm.version": __version__}
    try:
        if uri == local_store(cfg.run_dir):
            os.makedirs(os.path.join(cfg.run_dir, "mlflow"), exist_ok=True)
        client = _client(uri)
        experiment_id = _experiment(client, cfg.tracking.experiment or cfg.name, _artifact_location(cfg, uri))
        run_id, resumed = _open(
            client, experiment_id, stage, tags | lineage_tags(parents), key if resume else {}
        )
    except ImportError as exc:
        warn_once(uri, "importing mlflow", f"{exc} (pip install mlflow-skinny)")
        return Tracker()
    except Exception as exc:
        warn_once(uri, "starting a run", exc)
        return Tracker()
    tracker = Tracker(RunRef(uri, run_id, experiment_id), client)
    if not resumed:  # a param cannot change once logged; the resumed run has them
        tracker.log_params(flatten(params))
    return tracker


def start_child(parent: RunRef, name: str, params: dict[str, Any], key: dict[str, str]) -> Tracker:
    """A nested run under `parent` (a sweep's trial), or its existing one tagged `key` (a restored trial)."""
    tags = key | {"mlflow.parentRunId": parent.run_id}
    try:
        client = _client(parent.uri)
        run_id, resumed = _open(client, parent.experiment_id, name, tags, tags)
    except Exception as exc:
        warn_once(parent.uri, "starting a trial's run", exc)
        return Tracker()
    tracker = Tracker(RunRef(parent.uri, run_id, parent.experiment_id), client)
    if not resumed:
        tracker.log_params(flatten(params))
    return tracker


@contextmanager
def stage_run(
    cfg, stage: str, params: dict[str, Any], parents: list[str], output: str, resume: bool = False
) -> Iterator[Tracker]:
    """start(), then the run's status from how the block ends: FINISHED, KILLED on Ctrl-C, else FAILED."""
    tracker = start(cfg, stage, params, parents, output, resume)
    try:
        yield tracker
    except (KeyboardInterrupt, SystemExit):
        tracker.end(KILLED)
        raise
    except BaseException:
        tracker.end(FAILED)
        raise
    tracker.end(FINISHED)


# The per-step figures of a training history row (training/loop.py's step_row) that go to MLflow.
STEP_KEYS = (
    "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "eval_loss", "eval_perplexity",
    "checkpoint_s",
)  # fmt: skip
FLUSH_S = 5.0


class StepLogger:
    """Per-step metrics from rank 0 of the training loop (Ray Train, torchrun or one process alike),
    sent in batches every FLUSH_S seconds and at the end, so a step never waits on the store."""

    def __init__(self, ref: dict[str, str] | None, rank: int):
        self.tracker = Tracker(RunRef(**ref)) if ref and rank == 0 else Tracker()
        self.pending: list = []
        self.sent_at = time.monotonic()

    def log(self, row: dict[str, Any]) -> None:
        if not self.tracker.enabled:
            return
        from mlflow.entities import Metric

        at = int(row.get("t_wall", time.time()) * 1000)
        self.pending += [Metric(k, float(row[k]), at, int(row["step"])) for k in STEP_KEYS if k in row]
        if time.monotonic() - self.sent_at >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.tracker.log_metric_list(self.pending)
        self.pending, self.sent_at = [], time.monotonic()
