"""`raylm cluster check` on a KubeRay manifest (RayCluster, RayJob, RayService).

The manifest is validated against the CRD schema kept in cluster/kuberay/schema/ (see SOURCE.md there),
closed the way the API server's strict field validation closes it, and each rayStartParams key against
`ray start`'s own options (KubeRay passes them on as `--KEY`). Then raylm's rules: the head not exposed
outside Kubernetes, token auth, and the shared node-group rules of check_rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from raylm.cluster.check_model import NodeGroup, Problem, as_dict, as_list, dig, join, number, schema_problems
from raylm.cluster.check_rules import LOOPBACK, group_problems, misspelt_resources

SCHEMA_DIR = Path(__file__).resolve().parent / "kuberay" / "schema"
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
CLUSTER_SPEC = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}
MIN_TOKEN_RAY = (2, 52)  # KubeRay refuses authOptions.mode token below Ray 2.52
# Node labels that put a Kubernetes pod on spot / preemptible capacity (GKE, EKS, Karpenter, AKS).
SPOT_LABELS = {
    "cloud.google.com/gke-spot": "true", "cloud.google.com/gke-preemptible": "true",
    "eks.amazonaws.com/capacitytype": "spot", "karpenter.sh/capacity-type": "spot",
    "kubernetes.azure.com/scalesetpriority": "spot",
}  # fmt: skip


def check_kuberay(doc: dict) -> list[Problem]:
    """Every problem of one manifest whose kind is in KUBERAY_KINDS: schema first, then raylm's rules."""
    kind = doc["kind"]
    spec_path = CLUSTER_SPEC[kind]
    spec = as_dict(dig(doc, spec_path))
    problems = list(kuberay_metadata(doc)) + schema_problems(kuberay_schema(kind), doc, "kuberay_schema")
    specs = group_specs(spec, spec_path)
    problems += unknown_start_params(specs)
    for group, path, _ in specs:
        problems += misspelt_resources(as_dict(group.get("resources")), f"{path}.resources")
    problems += kuberay_dashboard_public(kind, spec, spec_path)
    problems += kuberay_token_auth(spec, spec_path)
    problems += group_problems([kuberay_group(group, path, head) for group, path, head in specs])
    return problems


def group_specs(spec: dict, spec_path: str) -> list[tuple[dict, str, bool]]:
    """(group spec, key path, is head) for the head group, then each worker group."""
    specs = [(as_dict(spec.get("headGroupSpec")), f"{spec_path}.headGroupSpec", True)]
    for i, group in enumerate(as_list(spec.get("workerGroupSpecs"))):
        specs.append((as_dict(group), f"{spec_path}.workerGroupSpecs[{i}]", False))
    return specs


# ---------------------------------------------------------------- schema and rayStartParams


@cache
def kuberay_schema(kind: str) -> dict:
    """The CRD schema, closed like the API server's strict field validation (see schema/SOURCE.md)."""
    return closed_schema(json.loads((SCHEMA_DIR / f"{KUBERAY_KINDS[kind]}.v1.json").read_text()))


def closed_schema(node: Any) -> Any:
    """The schema with additionalProperties: false on every object that lists its properties and does
    not preserve unknown fields: CRD schemas leave it out, yet the API server drops (or, strict, rejects)
    unknown fields, so a typo in a manifest would silently do nothing."""
    if isinstance(node, dict):
        node = {k: closed_schema(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    elif isinstance(node, list):
        node = [closed_schema(v) for v in node]
    return node


def kuberay_metadata(doc: dict) -> Iterator[Problem]:
    """What the schema file does not check: the API version it was taken from, and a name."""
    if doc.get("apiVersion") != "ray.io/v1":
        yield Problem(
            "apiVersion",
            "kuberay_schema",
            f"apiVersion {doc.get('apiVersion')!r}: the schema kept here is ray.io/v1",
        )
    if not isinstance(dig(doc, "metadata.name"), str):
        yield Problem("metadata.name", "kuberay_schema", "a manifest needs metadata.name")


@cache
def ray_start_options() -> frozenset[str]:
    """The long options of the installed Ray's `ray start`, read from its click command."""
    from ray.scripts.scripts import start

    return frozenset(o.lstrip("-") for p in start.params for o in p.opts if o.startswith("--"))


def unknown_start_params(specs: list[tuple[dict, str, bool]]) -> Iterator[Problem]:
    """KubeRay turns each rayStartParams key into a `ray start --KEY` option: check them against Ray's CLI."""
    for group, path, _ in specs:
        for key in as_dict(group.get("rayStartParams")):
            if key not in ray_start_options():
                yield Problem(f"{path}.rayStartParams.{key}", "unknown_key", "not an option of `ray start`")


# ---------------------------------------------------------------- head and worker groups as NodeGroups


def kuberay_group(group: dict, path: str, head: bool) -> NodeGroup:
    """A group as the shared rules see it; raylm counts as installed when the image name says so."""
    pod = as_dict(dig(group, "template.spec"))
    container = as_dict((as_list(pod.get("containers")) or [{}])[0])
    cpus, _ = group_resource(group, container, "num-cpus", "CPU", ("cpu",))
    gpus, gpus_at = group_resource(group, container, "num-gpus", "GPU", ("nvidia.com/gpu", "amd.com/gpu"))
    setup = " ".join(str(c) for c in as_list(container.get("command")) + as_list(container.get("args")))
    baked = "raylm" in str(container.get("image", ""))  # an image built with raylm inside
    return NodeGroup(
        path=path, head=head, spot_path=pod_spot_path(path, pod), cpus=number(cpus),
        gpus=number(gpus) or 0.0, gpus_path=join(path, gpus_at), min_workers=group.get("minReplicas", 0),
        max_workers=group.get("maxReplicas"), min_path=f"{path}.minReplicas",
        priority=int(number(group.get("priority", 0)) or 0),
        install=None if baked else (f"{path}.template.spec.containers[0].args", setup),
    )  # fmt: skip


def group_resource(
    group: dict, container: dict, start_key: str, name: str, k8s: tuple[str, ...]
) -> tuple[Any, str]:
    """A Ray resource of a group as KubeRay derives it: rayStartParams, then the group's resources map,
    then the Ray container's limits (requests for CPU). Returns (raw value, key path suffix)."""
    if start_key in as_dict(group.get("rayStartParams")):
        return group["rayStartParams"][start_key], f"rayStartParams.{start_key}"
    if name in as_dict(group.get("resources")):
        return group["resources"][name], f"resources.{name}"
    for kind in ("limits", "requests"):
        for key in k8s:
            value = as_dict(as_dict(container.get("resources")).get(kind)).get(key)
            if value is not None:
                return value, f"template.spec.containers[0].resources.{kind}.{key}"
    return None, ""


def pod_spot_path(path: str, pod: dict) -> str | None:
    """Spot capacity asked for by nodeSelector or a required node affinity on a spot label."""
    for key, value in as_dict(pod.get("nodeSelector")).items():
        if SPOT_LABELS.get(str(key).lower()) == str(value).lower():
            return f"{path}.template.spec.nodeSelector.{key}"
    terms = dig(pod, "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms")
    for term in as_list(terms):
        for expr in as_list(as_dict(term).get("matchExpressions")):
            if requires_spot_label(as_dict(expr)):
                return f"{path}.template.spec.affinity"
    return None


def requires_spot_label(expr: dict) -> bool:
    """A node-affinity matchExpression that admits only nodes carrying a spot label's spot value."""
    wanted = SPOT_LABELS.get(str(expr.get("key", "")).lower())
    return bool(
        wanted
        and expr.get("operator") == "In"
        and wanted in [str(v).lower() for v in as_list(expr.get("values"))]
    )


# ---------------------------------------------------------------- KubeRay-only rules


def kuberay_dashboard_public(kind: str, spec: dict, spec_path: str) -> Iterator[Problem]:
    """The head must not be exposed outside the Kubernetes network. A RayCluster's dashboard listens on
    loopback (kubectl port-forward reaches it there; KubeRay's default would be 0.0.0.0). A RayJob's and
    a RayService's must listen on the pod address, because the operator polls it through the head
    Service; token auth protects it."""
    head, path = as_dict(spec.get("headGroupSpec")), f"{spec_path}.headGroupSpec"
    yield from head_exposed(head, path)
    host = as_dict(head.get("rayStartParams")).get("dashboard-host", "0.0.0.0")
    if not isinstance(host, str):
        return  # the CRD schema check already reports a non-string rayStartParams value
    if kind == "RayCluster" and host not in LOOPBACK:
        yield Problem(
            f"{path}.rayStartParams.dashboard-host",
            "dashboard_public",
            f"dashboard bound to {host}; set 127.0.0.1 and use kubectl port-forward",
        )
    if kind != "RayCluster" and host in LOOPBACK:
        yield Problem(
            f"{path}.rayStartParams.dashboard-host",
            "dashboard_public",
            f"the operator cannot reach a {kind}'s dashboard on loopback",
        )


def head_exposed(head: dict, path: str) -> Iterator[Problem]:
    """A head Service of type LoadBalancer or NodePort, or an Ingress, reaches past the cluster network."""
    exposed = [
        ("serviceType", head.get("serviceType")),
        ("headService.spec.type", dig(head, "headService.spec.type")),
    ]
    for key, value in exposed:
        if value in ("LoadBalancer", "NodePort"):
            yield Problem(
                f"{path}.{key}",
                "dashboard_public",
                f"{value} exposes the dashboard outside the cluster; use ClusterIP + port-forward",
            )
    if head.get("enableIngress") is True:
        yield Problem(
            f"{path}.enableIngress",
            "dashboard_public",
            "an Ingress exposes the dashboard outside the cluster",
        )


def kuberay_token_auth(spec: dict, spec_path: str) -> Iterator[Problem]:
    """Token auth on, through authOptions, with a Ray new enough for KubeRay to accept it."""
    mode = dig(spec, "authOptions.mode")
    if mode != "token":
        yield Problem(
            f"{spec_path}.authOptions.mode",
            "token_auth_missing",
            f"authOptions.mode is {mode!r}, not 'token'",
        )
    version = tuple(int(x) for x in re.findall(r"\d+", str(spec.get("rayVersion", "")))[:2])
    if version < MIN_TOKEN_RAY:
        yield Problem(
            f"{spec_path}.rayVersion", "token_auth_missing", "token auth needs rayVersion 2.52.0 or later"
        )
