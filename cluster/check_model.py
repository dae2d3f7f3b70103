"""What every part of `raylm cluster check` shares: the Problem it reports, the NodeGroup the shared rules
judge, and the small helpers that walk a parsed YAML tree by key path.

Kept apart from cluster/check.py (the entry point) so that check_launcher, check_kuberay and check_rules
can import it without importing the entry point, which imports them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    path: str
    """Key path in the file, e.g. available_node_types.gpu_spot.min_workers."""
    rule: str
    message: str

    def line(self, file: str) -> str:
        return f"{file}: {self.path or '<file>'}: {self.message} [{self.rule}]"


@dataclass(frozen=True)
class NodeGroup:
    """A launcher node type or a KubeRay head/worker group, in the terms the shared rules need."""

    path: str
    head: bool
    spot_path: str | None  # where the file asks for spot capacity; None: on-demand
    cpus: float | None  # None: detected when the node starts
    gpus: float
    gpus_path: str
    min_workers: Any
    max_workers: Any
    min_path: str
    priority: int
    install: tuple[str, str] | None  # (key path, setup text); None: raylm comes with the node


# ---------------------------------------------------------------- walking parsed YAML


def join(path: str, key: Any) -> str:
    """The key path one step below `path`, written as the problem lines show it: a.b, a[0]."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def dig(node: Any, path: str) -> Any:
    """The value at a dotted path ('' is the node itself), or None where a step is missing."""
    for key in filter(None, path.split(".")):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def dig_path(doc: Any, path: str) -> Any:
    """dig() for paths with list indexes, as leaves() writes them."""
    for key in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if key.startswith("["):
            index = int(key[1:-1])
            doc = doc[index] if isinstance(doc, list) and index < len(doc) else None
        else:
            doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def as_dict(value: Any) -> dict:
    """The value if it is a mapping, else {}: a malformed file is the schema's to report, not a crash."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list:
    """The value if it is a list, else []: a malformed file is the schema's to report, not a crash."""
    return value if isinstance(value, list) else []


def number(value: Any) -> float | None:
    """A count from YAML or a Kubernetes quantity ('8', '500m'); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
        except ValueError:
            return None
    return None


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar in the tree with its key path, for rules that look at every value (token_in_file)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, join(path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, join(path, i))
    else:
        yield path, node


# ---------------------------------------------------------------- JSON schema validation


def schema_problems(schema: dict, instance: Any, rule: str) -> list[Problem]:
    """Every jsonschema error, at the key it concerns; an unexpected key is named in the path itself."""
    import jsonschema  # imported here: only `cluster check` needs it, not every raylm command

    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = []
    for error in validator.iter_errors(instance):
        path = ""
        for key in error.absolute_path:
            path = join(path, key)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            problems += unexpected_keys(error, path, rule)
            continue
        problems.append(Problem(path, rule, error.message[:300]))
    return problems


def unexpected_keys(error: Any, path: str, rule: str) -> list[Problem]:
    """One problem per key an additionalProperties error rejects, so the line names the typo itself
    rather than its parent (jsonschema's message lists them all at the parent)."""
    allowed = error.schema.get("properties", {})
    patterns = error.schema.get("patternProperties", {})
    return [
        Problem(join(path, key), rule, "unknown key (not in the schema)")
        for key in error.instance
        if key not in allowed and not any(re.search(p, str(key)) for p in patterns)
    ]
