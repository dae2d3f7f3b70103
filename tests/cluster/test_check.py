"""`raylm cluster check`: the shipped cluster files pass, and single-field mutations of them fail naming the key.

Each mutation changes one field of one shipped file (a typo at each level of nesting, min above max, a spot
head, a public dashboard, no token auth, a token in the file, a fractional GPU, no on-demand fallback, ...)
and must exit 2 with a line naming the mutated key path and the rule.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from raylm.core.cli import main

ROOT = Path(__file__).resolve().parents[2]
FILES = {p.stem: p for p in sorted((ROOT / "cluster").glob("*/*.yaml"))}


def steps(path: str) -> list[str | int]:
    return [int(k[1:-1]) if k.startswith("[") else k for k in re.findall(r"[^.\[\]]+|\[\d+\]", path)]


def parent_of(doc, path: str):
    *head, last = steps(path)
    for key in head:
        doc = doc[key]
    return doc, last


def setp(path: str, value):
    def op(doc):
        node, key = parent_of(doc, path)
        node[key] = value

    return op


def delete(path: str):
    def op(doc):
        node, key = parent_of(doc, path)
        del node[key]

    return op


def rename(path: str, new: str):
    def op(doc):
        node, key = parent_of(doc, path)
        node[new] = node.pop(key)

    return op


def edit(path: str, old: str, new: str):
    def op(doc):
        node, key = parent_of(doc, path)
        assert old in node[key], f"{old!r} not in {path}"
        node[key] = node[key].replace(old, new)

    return op


HEAD_CMD = "head_start_ray_commands[1]"
WORKER_CMD = "worker_start_ray_commands[1]"
RC = "spec"  # the RayCluster spec; a RayJob's is spec.rayClusterSpec, a RayService's spec.rayClusterConfig
SPOT_GROUP = f"{RC}.workerGroupSpecs[0]"
HEAD_GROUP = f"{RC}.headGroupSpec"

# (id, file, mutation, key path the message must name, rule)
MUTATIONS = [
    # --- typos at each level of a launcher YAML
    (
        "aws-top-typo",
        "aws",
        rename("idle_timeout_minutes", "idle_timout_minutes"),
        "idle_timout_minutes",
        "ray_schema",
    ),
    ("aws-provider-typo", "aws", rename("provider.region", "regoin"), "provider.regoin", "unknown_key"),
    # --- provider keys the schema leaves untyped
    (
        "onprem-worker-ip-mapping",
        "onprem",
        setp("provider.worker_ips[0]", {"host": "10.0.0.2"}),
        "provider.worker_ips[0]",
        "provider_type",
    ),
    (
        "fake-flag-as-word",
        "local-fake",
        setp("provider.use_node_id_as_ip", "yes"),
        "provider.use_node_id_as_ip",
        "provider_type",
    ),
    ("aws-auth-typo", "aws", rename("auth.ssh_user", "ssh_usr"), "auth.ssh_usr", "ray_schema"),
    (
        "aws-nodetype-typo",
        "aws",
        rename("available_node_types.gpu_spot.min_workers", "min_worker"),
        "available_node_types.gpu_spot.min_worker",
        "ray_schema",
    ),
    (
        "aws-resource-typo",
        "aws",
        rename("available_node_types.gpu_spot.resources.GPU", "gpu"),
        "available_node_types.gpu_spot.resources.gpu",
        "unknown_key",
    ),
    (
        "aws-docker-typo",
        "aws",
        setp("docker", {"imagee": "rayproject/ray:2.60.0"}),
        "docker.imagee",
        "ray_schema",
    ),
    ("aws-head-type-typo", "aws", setp("head_node_type", "haed"), "head_node_type", "ray_validate_config"),
    ("gcp-top-typo", "gcp", rename("setup_commands", "setup_command"), "setup_command", "ray_schema"),
    (
        "gcp-provider-typo",
        "gcp",
        rename("provider.project_id", "projectid"),
        "provider.projectid",
        "unknown_key",
    ),
    (
        "onprem-provider-typo",
        "onprem",
        rename("provider.worker_ips", "worker_ip"),
        "provider.worker_ip",
        "unknown_key",
    ),
    (
        "fake-top-typo",
        "local-fake",
        rename("idle_timeout_minutes", "idle_timeout_minute"),
        "idle_timeout_minute",
        "ray_schema",
    ),
    (
        "fake-provider-typo",
        "local-fake",
        rename("provider.use_node_id_as_ip", "use_node_id_as_ips"),
        "provider.use_node_id_as_ips",
        "unknown_key",
    ),
    (
        "fake-nodetype-typo",
        "local-fake",
        lambda d: d["available_node_types"]["ray.head.default"].update(max_worker=0),
        "available_node_types.ray.head.default.max_worker",
        "ray_schema",
    ),
    # --- wrong values in a launcher YAML
    (
        "aws-min-above-max",
        "aws",
        setp("available_node_types.gpu_spot.min_workers", 9),
        "available_node_types.gpu_spot.min_workers",
        "min_above_max",
    ),
    (
        "fake-min-above-max",
        "local-fake",
        lambda d: d["available_node_types"]["ray.worker.cpu"].update(min_workers=3),
        "available_node_types.ray.worker.cpu.min_workers",
        "min_above_max",
    ),
    (
        "gcp-min-sum-above-max",
        "gcp",
        setp("available_node_types.cpu_data.min_workers", 20),
        "max_workers",
        "ray_validate_config",
    ),
    (
        "aws-spot-head",
        "aws",
        setp("available_node_types.head.node_config.InstanceMarketOptions", {"MarketType": "spot"}),
        "available_node_types.head.node_config.InstanceMarketOptions.MarketType",
        "head_on_spot",
    ),
    (
        "gcp-spot-head",
        "gcp",
        setp("available_node_types.head.node_config.scheduling", {"provisioningModel": "SPOT"}),
        "available_node_types.head.node_config.scheduling",
        "head_on_spot",
    ),
    (
        "aws-public-dashboard",
        "aws",
        edit(HEAD_CMD, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        HEAD_CMD,
        "dashboard_public",
    ),
    (
        "onprem-public-dashboard",
        "onprem",
        edit(HEAD_CMD, "--dashboard-host=127.0.0.1", "--dashboard-host 10.0.0.10"),
        HEAD_CMD,
        "dashboard_public",
    ),
    ("aws-default-start-commands", "aws", delete("head_start_ray_commands"), HEAD_CMD, "dashboard_public"),
    (
        "aws-no-token-worker",
        "aws",
        edit(WORKER_CMD, "RAY_AUTH_MODE=token ", ""),
        WORKER_CMD,
        "token_auth_missing",
    ),
    (
        "onprem-no-token-head",
        "onprem",
        edit(HEAD_CMD, "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
        HEAD_CMD,
        "token_auth_missing",
    ),
    (
        "gcp-token-not-mounted",
        "gcp",
        lambda d: d["file_mounts"].pop("~/.ray/auth_token"),
        "file_mounts",
        "token_auth_missing",
    ),
    (
        "aws-token-in-file",
        "aws",
        edit(HEAD_CMD, "export RAY_AUTH_MODE", "export RAY_AUTH_TOKEN=" + "ab" * 32 + " RAY_AUTH_MODE"),
        HEAD_CMD,
        "token_in_file",
    ),
    (
        "gcp-token-key",
        "gcp",
        setp("provider.RAY_AUTH_TOKEN", "s3cr3t"),
        "provider.RAY_AUTH_TOKEN",
        "token_in_file",
    ),
    (
        "aws-fractional-gpu",
        "aws",
        setp("available_node_types.gpu_spot.resources.GPU", 0.5),
        "available_node_types.gpu_spot.resources.GPU",
        "fractional_gpu",
    ),
    (
        "gcp-fractional-gpu",
        "gcp",
        setp("available_node_types.gpu_ondemand.resources.GPU", 1.5),
        "available_node_types.gpu_ondemand.resources.GPU",
        "fractional_gpu",
    ),
    (
        "aws-no-fallback",
        "aws",
        delete("available_node_types.gpu_ondemand"),
        "available_node_types.gpu_spot",
        "spot_without_fallback",
    ),
    (
        "gcp-no-fallback",
        "gcp",
        delete("available_node_types.gpu_ondemand"),
        "available_node_types.gpu_spot",
        "spot_without_fallback",
    ),
    (
        "aws-fallback-preferred",
        "aws",
        setp("available_node_types.gpu_ondemand.priority", 20),
        "available_node_types.gpu_spot",
        "spot_without_fallback",
    ),
    ("aws-no-raylm", "aws", delete("setup_commands[2]"), "setup_commands", "raylm_not_installed"),
    ("onprem-no-raylm", "onprem", delete("setup_commands[2]"), "setup_commands", "raylm_not_installed"),
    (
        "aws-tiny-worker",
        "aws",
        setp("available_node_types.cpu_data.resources", {"CPU": 0}),
        "available_node_types.cpu_data",
        "no_stage_fits",
    ),
    (
        "fake-tiny-worker",
        "local-fake",
        lambda d: d["available_node_types"]["ray.worker.cpu"]["resources"].update(CPU=0),
        "available_node_types.ray.worker.cpu",
        "no_stage_fits",
    ),
    # --- typos at each level of a KubeRay manifest
    (
        "rc-spec-typo",
        "raycluster",
        rename(f"{RC}.enableInTreeAutoscaling", "enableInTreeAutoscalng"),
        f"{RC}.enableInTreeAutoscalng",
        "kuberay_schema",
    ),
    (
        "rc-head-typo",
        "raycluster",
        rename(f"{HEAD_GROUP}.rayStartParams", "rayStartParam"),
        f"{HEAD_GROUP}.rayStartParam",
        "kuberay_schema",
    ),
    (
        "rc-pod-typo",
        "raycluster",
        rename(f"{SPOT_GROUP}.template.spec.nodeSelector", "nodeSelecter"),
        f"{SPOT_GROUP}.template.spec.nodeSelecter",
        "kuberay_schema",
    ),
    (
        "rc-container-typo",
        "raycluster",
        rename(f"{SPOT_GROUP}.template.spec.containers[0].image", "imag"),
        f"{SPOT_GROUP}.template.spec.containers[0].imag",
        "kuberay_schema",
    ),
    (
        "rc-auth-typo",
        "raycluster",
        rename(f"{RC}.authOptions.mode", "mod"),
        f"{RC}.authOptions.mod",
        "kuberay_schema",
    ),
    (
        "rc-start-param-typo",
        "raycluster",
        rename(f"{HEAD_GROUP}.rayStartParams.dashboard-host", "dashbaord-host"),
        f"{HEAD_GROUP}.rayStartParams.dashbaord-host",
        "unknown_key",
    ),
    (
        "rc-wrong-type",
        "raycluster",
        setp(f"{SPOT_GROUP}.maxReplicas", "eight"),
        f"{SPOT_GROUP}.maxReplicas",
        "kuberay_schema",
    ),
    ("rc-kind-typo", "raycluster", setp("kind", "RayClustr"), "kind", "kuberay_schema"),
    # --- wrong values in a KubeRay manifest
    (
        "rc-min-above-max",
        "raycluster",
        setp(f"{SPOT_GROUP}.minReplicas", 9),
        f"{SPOT_GROUP}.minReplicas",
        "min_above_max",
    ),
    (
        "rc-spot-head",
        "raycluster",
        setp(f"{HEAD_GROUP}.template.spec.nodeSelector", {"cloud.google.com/gke-spot": "true"}),
        f"{HEAD_GROUP}.template.spec.nodeSelector.cloud.google.com/gke-spot",
        "head_on_spot",
    ),
    (
        "rc-load-balancer",
        "raycluster",
        setp(f"{HEAD_GROUP}.serviceType", "LoadBalancer"),
        f"{HEAD_GROUP}.serviceType",
        "dashboard_public",
    ),
    (
        "rc-public-dashboard",
        "raycluster",
        setp(f"{HEAD_GROUP}.rayStartParams.dashboard-host", "0.0.0.0"),
        f"{HEAD_GROUP}.rayStartParams.dashboard-host",
        "dashboard_public",
    ),
    ("rc-no-auth", "raycluster", delete(f"{RC}.authOptions"), f"{RC}.authOptions.mode", "token_auth_missing"),
    (
        "rc-auth-disabled",
        "raycluster",
        setp(f"{RC}.authOptions.mode", "disabled"),
        f"{RC}.authOptions.mode",
        "token_auth_missing",
    ),
    (
        "rc-token-env",
        "raycluster",
        setp(
            f"{HEAD_GROUP}.template.spec.containers[0].env", [{"name": "RAY_AUTH_TOKEN", "value": "s3cr3t"}]
        ),
        f"{HEAD_GROUP}.template.spec.containers[0].env[0].value",
        "token_in_file",
    ),
    (
        "rc-fractional-gpu",
        "raycluster",
        setp(f"{SPOT_GROUP}.rayStartParams", {"num-gpus": "0.5"}),
        f"{SPOT_GROUP}.rayStartParams.num-gpus",
        "fractional_gpu",
    ),
    (
        "rc-no-fallback",
        "raycluster",
        delete(f"{RC}.workerGroupSpecs[1]"),
        SPOT_GROUP,
        "spot_without_fallback",
    ),
    (
        "rc-no-raylm",
        "raycluster",
        delete(f"{RC}.workerGroupSpecs[2].template.spec.containers[0].args"),
        f"{RC}.workerGroupSpecs[2].template.spec.containers[0].args",
        "raylm_not_installed",
    ),
    ("rj-spec-typo", "rayjob", rename("spec.entrypoint", "entrypont"), "spec.entrypont", "kuberay_schema"),
    (
        "rj-loopback-dashboard",
        "rayjob",
        setp("spec.rayClusterSpec.headGroupSpec.rayStartParams.dashboard-host", "127.0.0.1"),
        "spec.rayClusterSpec.headGroupSpec.rayStartParams.dashboard-host",
        "dashboard_public",
    ),
    (
        "rj-min-above-max",
        "rayjob",
        setp("spec.rayClusterSpec.workerGroupSpecs[2].minReplicas", 20),
        "spec.rayClusterSpec.workerGroupSpecs[2].minReplicas",
        "min_above_max",
    ),
    (
        "rs-spec-typo",
        "rayservice",
        rename("spec.serveConfigV2", "serveConfig"),
        "spec.serveConfig",
        "kuberay_schema",
    ),
    (
        "rs-no-auth",
        "rayservice",
        delete("spec.rayClusterConfig.authOptions"),
        "spec.rayClusterConfig.authOptions.mode",
        "token_auth_missing",
    ),
    (
        "rs-old-ray",
        "rayservice",
        setp("spec.rayClusterConfig.rayVersion", "2.40.0"),
        "spec.rayClusterConfig.rayVersion",
        "token_auth_missing",
    ),
]


def check(path: Path, capsys) -> tuple[int, str]:
    code = main(["cluster", "check", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_there_are_forty_mutations_covering_every_shipped_file():
    assert len(MUTATIONS) >= 40
    assert {m[1] for m in MUTATIONS} == set(FILES)
    assert len({m[0] for m in MUTATIONS}) == len(MUTATIONS)


@pytest.mark.parametrize(("name", "file", "mutate", "key", "rule"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutation_is_rejected_naming_the_key(name, file, mutate, key, rule, tmp_path, capsys):
    doc = yaml.safe_load(FILES[file].read_text())
    mutate(doc)
    mutated = tmp_path / f"{file}.yaml"
    mutated.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, output = check(mutated, capsys)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith(f"{mutated}: {key}: ")]
    assert lines, f"no line names {key!r}:\n{output}"
    assert not rule or any(line.endswith(f"[{rule}]") for line in lines), output
