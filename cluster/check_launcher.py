"""`raylm cluster check` on a Ray cluster launcher YAML (what `ray up` reads).

First Ray's own judgement, as `ray up` would give it: Ray's schema (ray/autoscaler/ray-schema.json) and
Ray's `prepare_config` + `validate_config`. Then raylm's rules on the config as the launcher will run it
(Ray's provider defaults filled in, so a start command the file leaves to Ray is judged too): unknown
provider keys, the dashboard address, token auth, and the shared node-group rules of check_rules.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path
from typing import Any

from raylm.cluster.check_model import NodeGroup, Problem, as_dict, as_list, dig, join, number, schema_problems
from raylm.cluster.check_rules import LOOPBACK, group_problems, misspelt_resources

DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
# Provider keys Ray 2.60's node providers and autoscaler read beyond the schema's own list (grep of
# ray/autoscaler for provider_config reads), with the JSON type each read expects: the schema lets any key
# through, so a typo or a wrong type (`use_node_id_as_ip: "yes"`, truthy as a word) would pass unseen.
PROVIDER_EXTRA_TYPES = {
    "disable_launch_config_check": "boolean", "disable_node_updaters": "boolean",
    "use_node_id_as_ip": "boolean", "foreground_node_launch": "boolean", "worker_liveness_check": "boolean",
    "launch_multiple": "boolean", "use_external_head_ip": "boolean", "head_node_id": "string",
    "gcs_address": "string", "coordinator_address": "string", "external_head_ip": "string",
    "shared_volume_dir": "string", "project_name": "string", "image": "string", "key_pair": "object",
    "aws_credentials": "object", "env_vars": "object", "head_resources": "object",
    "cleanup_interval": "number",
}  # fmt: skip
PROVIDER_EXTRA_KEYS = set(PROVIDER_EXTRA_TYPES)
# Types the schema leaves open: the on-prem provider ssh-es to each worker_ips entry, so each is a host.
PROVIDER_TYPES = {
    **{key: {"type": kind} for key, kind in PROVIDER_EXTRA_TYPES.items()},
    "worker_ips": {"type": "array", "items": {"type": "string"}},
}
PROVIDER_TYPES_SCHEMA = {"properties": {"provider": {"properties": PROVIDER_TYPES}}}
DASHBOARD_HOST = re.compile(r"--dashboard-host[=\s]+['\"]?([^\s'\";]+)")
TOKEN_PATH_ASSIGNMENT = re.compile(r"RAY_AUTH_TOKEN_PATH=['\"]?([^\s'\";]+)")
TOKEN_AUTH_MODE = re.compile(r"\bRAY_AUTH_MODE=['\"]?token\b")


def check_launcher(cfg: dict) -> list[Problem]:
    """Every problem of one launcher YAML: Ray's findings first, then raylm's rules."""
    view = launcher_view(cfg)
    problems = ray_validation(cfg)
    problems += launcher_unknown_keys(cfg)
    problems += schema_problems(
        PROVIDER_TYPES_SCHEMA, {"provider": as_dict(cfg.get("provider"))}, "provider_type"
    )
    problems += launcher_dashboard_public(cfg, view)
    if provider_type(cfg) != "fake_multinode":  # its nodes are started by the head, with its environment
        problems += launcher_token_auth(cfg, view)
    problems += group_problems(launcher_groups(view))
    return problems


def provider_type(cfg: dict) -> str | None:
    return as_dict(cfg.get("provider")).get("type")


# ---------------------------------------------------------------- Ray's own validation


@cache
def ray_schema() -> dict:
    """The launcher schema shipped in the installed Ray, so the check follows the Ray that will run."""
    import ray.autoscaler  # imported here: only `cluster check` needs Ray's autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_validation(cfg: dict) -> list[Problem]:
    """Ray's schema on the config Ray would use, then Ray's own cross-field checks (`validate_config`).

    The fake multi-node provider is validated as written: its autoscaler reads the file as is, and Ray
    2.60's wheel lacks the defaults file `prepare_config` would merge in.
    """
    from ray.autoscaler._private.util import prepare_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # per-node-type chatter at INFO
    schema = ray_schema()
    prepared = cfg
    if provider_type(cfg) != "fake_multinode":
        try:
            with redirect_stdout(io.StringIO()):  # Ray's cli_logger prints what it raises
                prepared = prepare_config(json.loads(json.dumps(cfg)))  # on a copy: it fills in defaults
        except Exception as exc:  # any failure of Ray's preparation is a problem with the file
            return [*schema_problems(schema, cfg, "ray_schema"), Problem("", "ray_prepare_config", str(exc))]
    return schema_problems(schema, prepared, "ray_schema") or ray_cross_field_problems(prepared)


def ray_cross_field_problems(prepared: dict) -> list[Problem]:
    """What Ray's `validate_config` rejects beyond the schema, at the key its message is about."""
    from ray.autoscaler._private.util import validate_config

    try:
        validate_config(prepared)
    except (ValueError, RuntimeError) as exc:
        message = str(exc)
        if "max_workers" in message:
            path = "max_workers"
        elif "head_node" in message:
            path = "head_node_type"
        else:
            path = ""
        return [Problem(path, "ray_validate_config", message)]
    return []


def launcher_view(cfg: dict) -> dict:
    """The config as the launcher will run it: Ray's defaults for the provider under the file's keys
    (the merge is per top-level key, as in Ray's `fillout_defaults`), so omitted start commands count."""
    from ray.autoscaler._private.providers import _get_default_config

    try:
        defaults = _get_default_config(as_dict(cfg.get("provider")))
    except Exception:  # no defaults file for this provider (fake_multinode in Ray 2.60's wheel)
        defaults = {}
    return {**defaults, **cfg}


def from_defaults(cfg: dict, key: str) -> str:
    """A note for messages about a key the file leaves to Ray's defaults: the user did not write it."""
    return "" if key in cfg else f" (Ray's default: the file sets no {key})"


# ---------------------------------------------------------------- node types as NodeGroups


def launcher_groups(view: dict) -> list[NodeGroup]:
    """Every available_node_types entry; an on-prem file without them has one implicit head and worker
    type, whose resources Ray detects when the node starts."""
    groups = [
        launcher_group(view, name, as_dict(spec))
        for name, spec in as_dict(view.get("available_node_types")).items()
    ]
    if not groups and provider_type(view) == "local":
        for head in (True, False):
            install = launcher_install(view, {}, "provider", head)
            groups.append(NodeGroup("provider", head, None, None, 0.0, "", 0, None, "", 0, install))
    return groups


def launcher_group(view: dict, name: Any, spec: dict) -> NodeGroup:
    path, head = join("available_node_types", name), name == view.get("head_node_type")
    resources = as_dict(spec.get("resources"))
    exempt = provider_type(view) == "fake_multinode"  # nodes are processes of the head's own Python
    return NodeGroup(
        path=path, head=head, spot_path=launcher_spot_path(path, as_dict(spec.get("node_config"))),
        cpus=number(resources.get("CPU", 0)), gpus=number(resources.get("GPU", 0)) or 0.0,
        gpus_path=f"{path}.resources.GPU", min_workers=spec.get("min_workers", 0),
        max_workers=spec.get("max_workers"), min_path=f"{path}.min_workers",
        priority=int(number(spec.get("priority", 0)) or 0),
        install=None if exempt else launcher_install(view, spec, path, head),
    )  # fmt: skip


def launcher_install(view: dict, spec: dict, path: str, head: bool) -> tuple[str, str]:
    """(key to name, setup commands) a node of this type runs, as Ray picks them: the head runs
    setup_commands + head_setup_commands; a worker its type's own worker_setup_commands if it has
    them (they replace the rest), else setup_commands + the global worker_setup_commands."""
    if head:
        return "setup_commands", commands_text(view.get("setup_commands"), view.get("head_setup_commands"))
    if "worker_setup_commands" in spec:
        return f"{path}.worker_setup_commands", commands_text(spec["worker_setup_commands"])
    return "setup_commands", commands_text(view.get("setup_commands"), view.get("worker_setup_commands"))


def commands_text(*command_lists: Any) -> str:
    return "\n".join(str(c) for commands in command_lists for c in as_list(commands))


def launcher_spot_path(path: str, node_config: dict) -> str | None:
    """Where a node_config asks for spot capacity (AWS market type, GCP scheduling); None: on-demand."""
    market = dig(node_config, "InstanceMarketOptions.MarketType")  # AWS
    if isinstance(market, str) and market.lower() == "spot":
        return f"{path}.node_config.InstanceMarketOptions.MarketType"
    scheduling = node_config.get("scheduling")  # GCP: an object, or Ray's older list-of-objects form
    for item in as_list(scheduling) or [as_dict(scheduling)]:
        item = as_dict(item)
        if item.get("preemptible") is True or str(item.get("provisioningModel", "")).upper() == "SPOT":
            return f"{path}.node_config.scheduling"
    return None


# ---------------------------------------------------------------- launcher-only rules


def start_commands(view: dict) -> Iterator[tuple[str, str]]:
    """(key path, command) of every `ray start` the head and workers run."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, command in enumerate(as_list(view.get(key))):
            if "ray start" in str(command):
                yield join(key, i), str(command)


def launcher_dashboard_public(cfg: dict, view: dict) -> Iterator[Problem]:
    """The dashboard (and with it job submission) must listen on loopback; `ray dashboard` tunnels it."""
    for path, command in start_commands(view):
        for host in DASHBOARD_HOST.findall(command):
            if host not in LOOPBACK:
                where = from_defaults(cfg, path.split("[")[0])
                yield Problem(
                    path,
                    "dashboard_public",
                    f"dashboard bound to {host}{where}; use 127.0.0.1 and `ray dashboard`",
                )


def launcher_token_auth(cfg: dict, view: dict) -> Iterator[Problem]:
    """Every `ray start` runs with RAY_AUTH_MODE=token, and the token file it reads is in file_mounts."""
    token_path = DEFAULT_TOKEN_PATH
    for path, command in start_commands(view):
        if not TOKEN_AUTH_MODE.search(command):
            where = from_defaults(cfg, path.split("[")[0])
            yield Problem(path, "token_auth_missing", f"`ray start` without RAY_AUTH_MODE=token{where}")
        token_path = next(iter(TOKEN_PATH_ASSIGNMENT.findall(command)), token_path)
    mounted = {str(k).replace("$HOME/", "~/").rstrip("/") for k in as_dict(view.get("file_mounts"))}
    if any(True for _ in start_commands(view)) and token_path.replace("$HOME/", "~/") not in mounted:
        yield Problem(
            "file_mounts", "token_auth_missing", f"the token file {token_path} is not copied to the nodes"
        )


def launcher_unknown_keys(cfg: dict) -> Iterator[Problem]:
    """Ray's schema lets any provider key and any resource name through, so a typo there is silently
    ignored: name provider keys no Ray provider reads, and CPU/GPU misspelt as custom resources."""
    known = set(ray_schema()["properties"]["provider"]["properties"]) | PROVIDER_EXTRA_KEYS
    for key in as_dict(cfg.get("provider")):
        if key not in known:
            yield Problem(join("provider", key), "unknown_key", "no Ray node provider reads this key")
    for name, spec in as_dict(cfg.get("available_node_types")).items():
        yield from misspelt_resources(
            as_dict(as_dict(spec).get("resources")), f"available_node_types.{name}.resources"
        )
