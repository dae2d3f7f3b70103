"""raylm's rules that apply alike to Ray launcher YAMLs and KubeRay manifests.

The node-group rules see each file only as NodeGroups (check_launcher and check_kuberay translate their
node types and head/worker groups into them), so spot, GPU, scaling-bound, stage-fit and install rules
are written once. The token and resource-name rules look at raw keys and values, the same in both formats.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from raylm.cluster.check_model import NodeGroup, Problem, dig_path, join, leaves, number

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PIP_INSTALL_RAYLM = re.compile(r"\bpip3?\s+install\b[^;&|\n]*raylm")
TOKEN_ASSIGNMENT = re.compile(r"\bRAY_AUTH_TOKEN\s*[=:]\s*['\"]?(?![$'\"\s])\S")


# ---------------------------------------------------------------- rules on node groups


def head_on_spot(groups: list[NodeGroup]) -> Iterator[Problem]:
    for g in groups:
        if g.head and g.spot_path:
            yield Problem(
                g.spot_path,
                "head_on_spot",
                "the head runs on spot capacity: a preemption loses the whole cluster; use on-demand",
            )


def spot_without_fallback(groups: list[NodeGroup]) -> Iterator[Problem]:
    """A spot worker type needs an on-demand type that can run its work (at least as many GPUs) and that
    the autoscaler tries only after it (a lower priority), so a spot shortage delays work instead of
    stopping it and on-demand prices are paid only when spot is short."""
    workers = [g for g in groups if not g.head]
    for g in workers:
        if not g.spot_path:
            continue
        fallbacks = [f for f in workers if not f.spot_path and f.gpus >= g.gpus and f.max_workers != 0]
        if not fallbacks:
            yield Problem(
                g.path,
                "spot_without_fallback",
                f"spot worker type with no on-demand type of at least {g.gpus:g} GPU to fall back on",
            )
        elif all(f.priority >= g.priority for f in fallbacks):
            yield Problem(
                g.path,
                "spot_without_fallback",
                f"its on-demand fallback must have a lower priority than {g.priority} (or spot is never preferred)",
            )


def fractional_gpu(groups: list[NodeGroup]) -> Iterator[Problem]:
    for g in groups:
        if g.gpus != int(g.gpus):
            yield Problem(
                g.gpus_path,
                "fractional_gpu",
                f"{g.gpus:g} GPUs: a node has whole GPUs (fractions are for tasks and actors)",
            )


def min_above_max(groups: list[NodeGroup]) -> Iterator[Problem]:
    for g in groups:
        low, high = number(g.min_workers), number(g.max_workers)
        if low is not None and high is not None and low > high:
            yield Problem(g.min_path, "min_above_max", f"minimum {low:g} is above maximum {high:g}")


@cache
def stage_requests() -> tuple[tuple[str, dict[str, float]], ...]:
    """The smallest resource request of each raylm stage, from the stages' own config defaults: a curate
    task takes Ray Data's default of 1 CPU; a training worker cpus_per_worker CPUs (plus 1 GPU with
    use_gpu); a serving replica num_cpus CPUs and num_gpus GPUs."""
    from raylm.serving.config import ServeConfig
    from raylm.training.config import TrainConfig

    train_cpus = TrainConfig.model_fields["cpus_per_worker"].default
    serve_cpus = ServeConfig.model_fields["num_cpus"].default
    serve_gpus = ServeConfig.model_fields["num_gpus"].default
    return (
        ("curate", {"CPU": 1.0}),
        ("train", {"CPU": train_cpus}),
        ("train (use_gpu)", {"CPU": train_cpus, "GPU": 1.0}),
        ("serve", {"CPU": serve_cpus, "GPU": serve_gpus}),
    )


def no_stage_fits(groups: list[NodeGroup]) -> Iterator[Problem]:
    """A worker type is useless to raylm when no stage's request fits on one of its nodes: the
    autoscaler would never start it, or a job would wait for it forever. Types whose CPUs Ray detects at
    start (on-prem, KubeRay without CPU limits) are not judged."""
    for g in groups:
        if g.head or g.cpus is None:
            continue
        have = {"CPU": g.cpus, "GPU": g.gpus}
        if not any(all(have.get(k, 0) >= v for k, v in need.items()) for _, need in stage_requests()):
            smallest = ", ".join(f"{name} {need}" for name, need in stage_requests())
            yield Problem(
                g.path, "no_stage_fits", f"{g.cpus:g} CPU / {g.gpus:g} GPU fits no raylm stage ({smallest})"
            )


def raylm_not_installed(groups: list[NodeGroup]) -> Iterator[Problem]:
    """Setup text with no `pip install ... raylm`; several groups sharing one setup key (the launcher's
    setup_commands) are reported once, at that key."""
    seen = set()
    for g in groups:
        if g.install and g.install[0] not in seen and not PIP_INSTALL_RAYLM.search(g.install[1]):
            seen.add(g.install[0])
            yield Problem(
                g.install[0],
                "raylm_not_installed",
                "no `pip install` of raylm: the nodes could not run raylm jobs",
            )


GROUP_RULES = (
    head_on_spot,
    spot_without_fallback,
    fractional_gpu,
    min_above_max,
    no_stage_fits,
    raylm_not_installed,
)


def group_problems(groups: list[NodeGroup]) -> list[Problem]:
    """Every node-group rule on the groups of one file, rule by rule (the order the lines come out in)."""
    problems: list[Problem] = []
    for rule in GROUP_RULES:
        problems += rule(groups)
    return problems


# ---------------------------------------------------------------- rules on raw keys and values


def misspelt_resources(resources: dict, path: str) -> Iterator[Problem]:
    """'cpu', 'GPUs' and the like are legal custom resource names to Ray, so nothing else would notice
    that the node then offers no CPUs or GPUs to tasks."""
    for key in resources:
        if re.fullmatch(r"(?i)(cpu|gpu)s?", str(key)) and key not in ("CPU", "GPU"):
            yield Problem(
                join(path, key),
                "unknown_key",
                f"Ray's resource is spelt {str(key)[:3].upper()}; '{key}' would be a custom resource",
            )


def token_in_file(doc: Any) -> Iterator[Problem]:
    """A token belongs in a file on the operator's machine or a Kubernetes Secret, never in here:
    `RAY_AUTH_TOKEN=...` in a command, a RAY_AUTH_TOKEN key, or a container env entry with a value."""
    for path, value in leaves(doc):
        if isinstance(value, str) and (
            TOKEN_ASSIGNMENT.search(value) or (path.endswith(".RAY_AUTH_TOKEN") and value.strip())
        ):
            yield Problem(
                path,
                "token_in_file",
                "a Ray auth token written into the file; mount the token file or use a Secret",
            )
        if path.endswith(".name") and value == "RAY_AUTH_TOKEN":
            parent = path[: -len(".name")]
            if dig_path(doc, parent + ".value"):
                yield Problem(
                    parent + ".value",
                    "token_in_file",
                    "RAY_AUTH_TOKEN given as a literal; use valueFrom.secretKeyRef",
                )
