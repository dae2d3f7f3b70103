"""`raylm runs` and `raylm show`: what a runs folder holds, and where an artifact came from.

Both only read: the folders each stage writes under a run (the stage table, core/stages.py), their
manifest.json (core/lineage.py; present = complete, since it is written last) and the `parents` each
manifest names. Paths may be local or storage URIs (s3://, gs://, file://): every read goes through
core/storage.py.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import yaml

from raylm.core import storage
from raylm.core.artifacts import (
    COMPRESS,
    CURATED,
    EXPORT_ADAPTER,
    EXPORT_MODEL,
    RUN,
    SERVE,
    TRAIN,
    TUNE,
    RunDir,
)
from raylm.core.errors import InputError
from raylm.core.lineage import utc_timestamp
from raylm.core.outputs import MARKER, PARTIAL  # PARTIAL: its stage is running, or was killed
from raylm.core.stages import STAGES

# A stage output's status in `raylm runs`.
COMPLETE, INCOMPLETE, STARTED, CONFIGURED, UNREADABLE = (
    "complete",
    "incomplete",
    "started",
    "configured",
    "unreadable",
)


# -- reading folders and manifests -------------------------------------------------------------------


def clean(path: str) -> str:
    """One spelling per folder: a URI without its trailing slash, a local path made absolute; a
    manifest.json path stands for its folder (`parents` entries are manifest paths)."""
    path = path.rstrip("/") if is_uri(path) else os.path.abspath(path)
    return parent_of(path) if path.endswith(f"/{storage.MANIFEST}") else path


def is_uri(path: str) -> bool:
    """s3://, gs://, file://, ... (storage.is_remote leaves out file://, which is still no local path)."""
    return "://" in path


def parent_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_uri(path) else os.path.dirname(path)


def entries(folder: str) -> dict[str, pafs.FileInfo] | None:
    """Name -> FileInfo of what lies directly in a folder; None when it is not a folder."""
    fs, path = storage.filesystem(folder)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    return {os.path.basename(i.path.rstrip("/")): i for i in fs.get_file_info(pafs.FileSelector(path))}


def mtime(info: pafs.FileInfo) -> str | None:
    """A file's modification time in the manifests' format (created_at)."""
    return utc_timestamp(info.mtime_ns / 1e9) if info.mtime_ns is not None else None


def read_doc(uri: str) -> dict[str, Any] | None:
    """A JSON or YAML file as a dict; None when it is missing or unreadable (a listing goes on)."""
    try:
        text = storage.read_text(uri)
        doc = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def manifest_of(folder: str) -> dict[str, Any] | None:
    return read_doc(storage.join(folder, storage.MANIFEST))


# -- key figures ---------------------------------------------------------------------------------------


def num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def joined(*parts: str | None) -> str:
    return ", ".join(p for p in parts if p)


def labelled(label: str, value: Any) -> str | None:
    return f"{label} {num(value)}" if value is not None else None


def curated_figures(m: dict[str, Any]) -> str:
    c = m.get("counts") or {}
    kept = c.get("after_near_dedup")
    return joined(
        f"{num(c['documents_read'])} documents in" if "documents_read" in c else None,
        f"{num(kept)} kept" if kept is not None else None,
        f"{num(c['tokens'])} tokens" if "tokens" in c else None,
        labelled("seq_len", m.get("seq_len")),
    )


def train_figures(m: dict[str, Any]) -> str:
    f = m.get("final") or {}
    return joined(
        labelled("step", f.get("step")),
        labelled("loss", f.get("loss")),
        labelled("eval loss", f.get("eval_loss")),
        labelled("eval perplexity", f.get("eval_perplexity")),
    )


def tune_figures(m: dict[str, Any]) -> str:
    s = m.get("summary") or {}
    trials = f"of {s['trials']} trials ({s.get('completed')} completed)" if "trials" in s else None
    return joined(
        labelled("best trial", s.get("best_trial")), labelled("eval loss", s.get("best_eval_loss")), trials
    )


def compress_figures(m: dict[str, Any]) -> str:
    rows = [r for r in m.get("comparison") or [] if r.get("method") != "reference"]
    return joined(
        *(
            f"{r['method']} perplexity x{r['perplexity_ratio']:.4f} size x{r['bytes_ratio']:.3f}"
            for r in rows
            if isinstance(r.get("perplexity_ratio"), float | int)
            and isinstance(r.get("bytes_ratio"), float | int)
        )
    ) or joined(*(m.get("methods") or {}))


def export_figures(m: dict[str, Any]) -> str:
    model = m.get("model") or {}
    return joined(
        model.get("format"), labelled("steps", model.get("steps")), labelled("base", model.get("base_model"))
    )


FIGURES = {
    CURATED: curated_figures,
    TRAIN: train_figures,
    TUNE: tune_figures,
    COMPRESS: compress_figures,
    EXPORT_MODEL: export_figures,
    EXPORT_ADAPTER: export_figures,
}


def figures(m: dict[str, Any]) -> str:
    """The key figures of a manifest by its kind; one of another shape (hand-edited, from an older raylm)
    shows none rather than stopping the listing."""
    try:
        return FIGURES.get(m.get("kind"), lambda _: "")(m)
    except (AttributeError, TypeError, KeyError, ValueError):
        return ""


def serve_section(serve_dir: str) -> dict[str, Any] | None:
    """The serve section recorded in serve_config.yaml (the Ray Serve config `raylm serve` writes)."""
    run = RunDir(parent_of(serve_dir))
    if run.serve != serve_dir:  # not a run's serve/ folder
        return None
    doc = read_doc(run.serve_config) or {}
    apps = doc.get("applications")
    app = apps[0] if isinstance(apps, list) and apps and isinstance(apps[0], dict) else {}
    serve = app.get("args", {}).get("serve") if isinstance(app.get("args"), dict) else None
    return serve if isinstance(serve, dict) else None


def serve_figures(serve: dict[str, Any]) -> str:
    http = serve.get("http") or {}
    return joined(
        labelled("model", serve.get("model")),
        labelled("sweep", serve.get("sweep")),
        labelled("engine", serve.get("engine")),
        f"http {http.get('host')}:{http.get('port')}" if http else None,
    )


# -- raylm runs ----------------------------------------------------------------------------------------


@dataclass
class StageState:
    """One stage's output under a run, as `raylm runs` lists it."""

    stage: str
    folder: str
    status: str
    when: str | None
    figures: str = ""


def stage_folders(run: str) -> list[tuple[str, str]]:
    """(stage, folder) for every stage of the table, where it writes under a run by default (serve has
    no output field: it writes serve/serve_config.yaml)."""
    layout = RunDir(run)
    return [(s.name, s.default_output(layout) if s.default_output else layout.serve) for s in STAGES]


def is_run(listing: dict[str, pafs.FileInfo], run: str) -> bool:
    """A folder holding a stage's output (or its staging sibling), or claimed as a run."""
    names = {os.path.basename(f) for _, f in stage_folders(run)}
    staged = {n.split(PARTIAL)[0] for n in listing if PARTIAL in n}
    return (
        bool(names & (set(listing) | staged))
        or (read_doc(storage.join(run, MARKER)) or {}).get("kind") == RUN
    )


def stage_state(stage: str, folder: str, listing: dict[str, pafs.FileInfo]) -> StageState | None:
    """The stage's output folder: complete (manifest), incomplete (folder without one), started (only a
    staging sibling), or None when the stage never ran here."""
    name = os.path.basename(folder)
    if name not in listing:
        staged = [info for n, info in listing.items() if n.startswith(name + PARTIAL)]
        when = max((mtime(info) or "" for info in staged), default="") or None
        return StageState(stage, folder, STARTED, when) if staged else None
    if stage == SERVE:
        serve = serve_section(folder)
        marker = read_doc(storage.join(folder, MARKER)) or {}
        when = marker.get("created_at") or mtime(listing[name])
        return StageState(
            stage, folder, CONFIGURED if serve else INCOMPLETE, when, serve_figures(serve or {})
        )
    if not storage.is_complete(folder):
        return StageState(stage, folder, INCOMPLETE, mtime(listing[name]))
    manifest = manifest_of(folder)
    if manifest is None:
        return StageState(stage, folder, UNREADABLE, mtime(listing[name]), "manifest.json cannot be read")
    created = manifest.get("created_at")
    return StageState(stage, folder, COMPLETE, str(created) if created else None, figures(manifest))


def run_stages(run: str, listing: dict[str, pafs.FileInfo]) -> list[StageState]:
    states = (stage_state(stage, folder, listing) for stage, folder in stage_folders(run))
    return [s for s in states if s is not None]


def find_runs(root: str) -> list[tuple[str, list[StageState]]]:
    """(run folder, its stages) for `root` itself when it is a run, else for each run folder in it."""
    listing = entries(root)
    if listing is None:
        what = "is not a folder" if storage.exists(root) else "does not exist"
        raise InputError(f"runs folder {root} {what}")
    if is_run(listing, root):
        return [(root, run_stages(root, listing))]
    found = []
    for name, info in sorted(listing.items()):
        run = storage.join(root, name)
        sub = entries(run) if info.type == pafs.FileType.Directory else None
        if sub is not None and is_run(sub, run):
            found.append((run, run_stages(run, sub)))
    if not found:
        names = ", ".join(f"{os.path.basename(f)}/" for _, f in stage_folders(root))
        raise InputError(f"no runs under {root}: a run folder holds stage outputs ({names})")
    return found


def run_lines(run: str, stages: list[StageState]) -> list[str]:
    whens = [s.when for s in stages if s.when]
    lines = [f"{os.path.basename(run)}  {max(whens) if whens else '-'}  {run}"]
    width = max((len(s.stage) for s in stages), default=0)
    for s in stages:
        lines.append(f"  {s.stage:<{width}}  {s.status:<10}  {s.when or '-':<20}  {s.figures}".rstrip())
    return lines


def runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="?",
        default="runs",
        help="folder or storage URI holding run folders (default ./runs), or one run folder",
    )


def runs_main(args: argparse.Namespace) -> int:
    for i, (run, stages) in enumerate(find_runs(clean(args.runs))):
        print(("\n" if i else "") + "\n".join(run_lines(run, stages)))
    return 0


# -- raylm show ----------------------------------------------------------------------------------------


@dataclass
class Step:
    """One artifact of a lineage chain: what `raylm show` prints for it."""

    kind: str
    folder: str
    created_at: str | None
    config: Any
    parents: list[str]
    """Manifest paths of the artifacts it was made from."""
    notes: list[str] = field(default_factory=list)


def manifest_step(folder: str, manifest: dict[str, Any]) -> Step:
    notes = [figures(manifest), corpus_snapshot(manifest)]
    listed = manifest.get("parents")
    parents = [p for p in listed if isinstance(p, str)] if isinstance(listed, list) else []
    # An adapter's (or fine-tuned model's) manifest names its data as parent; the base model it was
    # trained from is lineage too when raylm made it (a model with a manifest).
    base = (
        (manifest.get("model") or {}).get("base_model") if isinstance(manifest.get("model"), dict) else None
    )
    if isinstance(base, str) and storage.is_complete(base):
        parents.insert(0, storage.join(base, storage.MANIFEST))
    kind = str(manifest.get("kind", "?"))
    return Step(
        kind, folder, manifest.get("created_at"), manifest.get("config"), parents, [n for n in notes if n]
    )


def corpus_snapshot(manifest: dict[str, Any]) -> str:
    """Where a curated folder's corpus came from: the sources and the fingerprint of the files read."""
    inputs = manifest.get("inputs") or {}
    sources = [
        s.get("path") for s in (manifest.get("config") or {}).get("sources") or [] if isinstance(s, dict)
    ]
    if not inputs and not sources:
        return ""
    snapshot = joined(
        labelled("fingerprint", inputs.get("fingerprint")),
        labelled("files", inputs.get("files")),
        labelled("bytes", inputs.get("bytes")),
    )
    return f"corpus snapshot: {joined(labelled('sources', ' '.join(map(str, sources)) or None), snapshot)}"


def serve_step(folder: str) -> Step | None:
    """serve/ has no manifest: its serve_config.yaml names the model and the sweep it serves."""
    serve = serve_section(folder)
    if serve is None:
        return None
    adapters = list(((serve.get("adapters") or {}).get("paths") or {}).values())
    reads = [p for p in [serve.get("model"), serve.get("sweep"), *adapters] if isinstance(p, str)]
    marker = read_doc(storage.join(folder, MARKER)) or {}
    parents = [storage.join(clean(p), storage.MANIFEST) for p in reads]
    return Step(SERVE, folder, marker.get("created_at"), serve, parents, [serve_figures(serve)])


def producer_note(folder: str) -> str | None:
    """An export inside a training or tuning output (train/export, tune/best_adapter): the stage that
    made it, with its figures, since the export's own manifest names only its data."""
    manifest = manifest_of(parent_of(folder))
    if manifest is None or manifest.get("kind") not in (TRAIN, TUNE, COMPRESS):
        return None
    made = f"made by {manifest['kind']} {parent_of(folder)} ({manifest.get('created_at')})"
    return f"{made}: {figures(manifest)}" if figures(manifest) else made


def artifact_step(folder: str, manifest: dict[str, Any]) -> Step:
    """A folder with its own manifest, and the stage output it lies in when there is one."""
    step = manifest_step(folder, manifest)
    note = producer_note(folder)
    step.notes += [note] if note else []
    return step


def part_of(folder: str) -> Step | None:
    """A folder without a manifest inside an output that has one (a compress method folder): that
    output's step, noting which part of it this is."""
    parent = parent_of(folder)
    manifest = manifest_of(parent)
    if manifest is None:
        return None
    step = manifest_step(parent, manifest)
    name = os.path.basename(folder)
    method = (manifest.get("methods") or {}).get(name)
    detail = f": {joined(*(f'{k} {num(v)}' for k, v in method.items() if k != 'path'))}" if method else ""
    step.notes.insert(0, f"{folder} is {name} of this {step.kind} output{detail}")
    return step


def latest_output(run: str, listing: dict[str, pafs.FileInfo]) -> Step:
    """A run folder stands for its newest complete stage output."""
    done = [s for s in run_stages(run, listing) if s.status in (COMPLETE, CONFIGURED)]
    if not done:
        raise InputError(
            f"run folder {run} has no complete stage output yet (no manifest.json in its stages)"
        )
    latest = max(reversed(done), key=lambda s: s.when or "")  # a tie goes to the later stage
    step = start(latest.folder)
    step.notes.insert(0, f"the latest stage output of run {run}: {latest.stage}")
    return step


def start(path: str) -> Step:
    """The artifact at `path` (its own manifest, a run's latest output, a serve folder, or a part of an
    output with a manifest); InputError naming the path when it is none of these."""
    folder = clean(path)
    listing = entries(folder)
    if listing is None:
        what = "is a file, not an artifact folder" if storage.exists(folder) else "does not exist"
        raise InputError(f"{folder} {what}")
    manifest = manifest_of(folder)
    if manifest is not None:
        return artifact_step(folder, manifest)
    if storage.MANIFEST in listing:
        raise InputError(f"{storage.join(folder, storage.MANIFEST)} cannot be read as a manifest")
    if is_run(listing, folder):
        return latest_output(folder, listing)
    step = serve_step(folder) or part_of(folder)
    if step is None:
        raise InputError(
            f"{folder} has no {storage.MANIFEST} (nor has {parent_of(folder)}): not a raylm artifact or run folder"
        )
    return step


def yaml_lines(config: Any) -> list[str]:
    """The config section as compact YAML: innermost mappings and lists on one line each."""
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)
    return text.splitlines()


def render(step: Step, pad: str, seen: dict[str, str], out: list[str]) -> None:
    """The step, then each parent's under it, indented one more level; a parent already printed is
    named, not repeated (a tune output and its base model both come from the same curated data)."""
    out.append(f"{pad}{'<- ' if pad else ''}{step.kind}  {step.folder}  (created {step.created_at or '?'})")
    body = pad + ("   " if pad else "  ")
    out.extend(f"{body}{note}" for note in step.notes)
    if isinstance(step.config, dict) and step.config:
        out.append(f"{body}config:")
        out.extend(f"{body}  {line}" for line in yaml_lines(step.config))
    seen[step.folder] = step.kind
    for manifest_path in step.parents:
        parent = clean(manifest_path)
        manifest = manifest_of(parent) if parent not in seen else None
        if parent in seen:
            out.append(f"{body}<- {seen[parent]}  {parent}  (shown above)")
        elif manifest is None:
            out.append(f"{body}<- {manifest_path}: missing or unreadable (moved or deleted since?)")
        else:
            render(artifact_step(parent, manifest), body, seen, out)


def show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "artifact",
        help="a run folder or an artifact folder (curated, export, adapter, compress method, serve), "
        "local or a storage URI",
    )


def show_main(args: argparse.Namespace) -> int:
    out: list[str] = []
    render(start(args.artifact), "", {}, out)
    print("\n".join(out))
    return 0
