"""`raylm cluster check FILE...`: validate Ray cluster launcher YAMLs and KubeRay manifests before use.

A launcher YAML is checked with Ray's own schema (ray/autoscaler/ray-schema.json) and Ray's own
`prepare_config` + `validate_config`, as `ray up` does; a KubeRay manifest (RayCluster, RayJob, RayService)
against the CRD schema kept in cluster/kuberay/schema/ (see SOURCE.md there) and `ray start`'s own options
for rayStartParams. Then raylm's rules, one function each, named in every message:

  head_on_spot           the head node on spot/preemptible capacity (losing it loses the cluster)
  spot_without_fallback  a spot worker type with no on-demand type of lower priority that can take its work
  dashboard_public       the dashboard bound to a non-loopback address, or the head exposed outside Kubernetes
  token_auth_missing     a `ray start` without RAY_AUTH_MODE=token, no token file mounted, authOptions unset
  token_in_file          a Ray auth token written into the file itself
  fractional_gpu         a node type or group with a fractional GPU count
  min_above_max          min_workers above max_workers (minReplicas above maxReplicas)
  no_stage_fits          a worker type too small for every raylm stage's smallest request
  raylm_not_installed    setup commands (container args on Kubernetes) that do not pip install raylm
  unknown_key            a provider key no Ray provider reads; a resource named like CPU/GPU but misspelt

Every problem is one line `FILE: key.path: message [rule]`; any problem exits with code 2.

This module is the entry point (arguments, reading files, telling the formats apart, output, exit code).
The checks live in check_launcher (launcher YAMLs), check_kuberay (KubeRay manifests) and check_rules
(rules shared by both); Problem and the YAML path helpers in check_model.
"""

from __future__ import annotations

import argparse
import os
import stat
from typing import Any

import yaml

from raylm.cluster.check_kuberay import KUBERAY_KINDS, check_kuberay
from raylm.cluster.check_launcher import check_launcher
from raylm.cluster.check_model import Problem
from raylm.cluster.check_rules import token_in_file
from raylm.core.errors import ConfigError

__all__ = ["Problem", "add_arguments", "check_document", "check_file", "main"]

MAX_FILE_BYTES = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="validate launcher YAMLs and KubeRay manifests; starts nothing")
    check.add_argument("files", nargs="+", metavar="FILE", help="cluster launcher YAML or KubeRay manifest")


def main(args: argparse.Namespace) -> int:
    """Print every problem of every file, then a summary; ConfigError (exit 2) if any file has one."""
    counts: dict[str, int] = {}
    bad = 0
    for file in args.files:
        kinds, problems = check_file(file)
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
        for problem in problems:
            print(problem.line(file))
        bad += bool(problems)
    if bad:
        raise ConfigError(f"cluster check: problems in {bad} of {len(args.files)} file(s)")
    what = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(f"raylm cluster check: {len(args.files)} file(s) OK ({what})")
    return 0


def check_file(path: str) -> tuple[list[str], list[Problem]]:
    """(kinds of the documents in the file, problems); a multi-document file prefixes paths with [doc N]."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, /dev/zero never end
            return [], [Problem("", "format", "not a regular file")]
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:  # a stray data file or log: not worth parsing in full
            return [], [Problem("", "format", f"larger than any cluster file ({MAX_FILE_BYTES} bytes)")]
        docs = [d for d in yaml.safe_load_all(raw.decode("utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [], [Problem("", "format", f"cannot read: {str(exc).splitlines()[0]}")]
    except RecursionError:
        return [], [Problem("", "format", "nested too deeply to parse")]
    kinds, problems = [], []
    for i, doc in enumerate(docs or [None]):
        kind, found = check_document(doc)
        kinds.append(kind)
        prefix = f"[doc {i}] " if len(docs) > 1 else ""
        problems += [Problem(prefix + p.path, p.rule, p.message) for p in found]
    return kinds, problems


def check_document(doc: Any) -> tuple[str, list[Problem]]:
    """(what the document is, its problems): KubeRay by apiVersion, a launcher YAML by its top keys."""
    if isinstance(doc, dict) and "apiVersion" in doc:
        if not isinstance(doc["apiVersion"], str):
            return "kuberay", [Problem("apiVersion", "kuberay_schema", "apiVersion must be a string")]
        if not doc["apiVersion"].startswith("ray.io/"):
            return "other", []  # a Secret or Service next to the cluster: Kubernetes' business
        if not isinstance(doc.get("kind"), str) or doc.get("kind") not in KUBERAY_KINDS:
            message = f"kind {doc.get('kind')!r} is not one of {sorted(KUBERAY_KINDS)}"
            return "kuberay", [Problem("kind", "kuberay_schema", message)]
        return "kuberay", check_kuberay(doc) + list(token_in_file(doc))
    if isinstance(doc, dict) and ("provider" in doc or "cluster_name" in doc):
        return "launcher", check_launcher(doc) + list(token_in_file(doc))
    message = "neither a Ray cluster launcher YAML (provider, cluster_name) nor a KubeRay manifest (apiVersion, kind)"
    return "unknown", [Problem("", "format", message)]
