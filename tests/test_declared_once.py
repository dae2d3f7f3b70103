"""Metrics and reject reasons are declared once (core/metrics.py, each stage's reason constants); these
tests fail on code that emits a metric or a reason that is not declared, or a name off the convention."""

import ast
import re
from pathlib import Path

import pytest

from raylm.core import metrics
from raylm.pipelines import classify, filters, langid, normalize, readers, sensitive
from raylm.pipelines.run import drops_by_stage

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "pipelines", "training", "serving", "tuning", "cluster"]


def sources():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def calls(tree: ast.AST, name: str):
    """Calls whose function is `name` or `<anything>.name`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == name) or (
                isinstance(func, ast.Attribute) and func.attr == name
            ):
                yield node


@pytest.mark.parametrize("metric", sorted(metrics.REGISTRY.values(), key=lambda m: m.name), ids=str)
def test_metric_names_follow_the_convention(metric):
    assert metrics.NAME.match(metric.name), metric.name
    assert metric.description and metric.tag_keys
    if metric.kind == "counter":
        assert metric.name.endswith("_total"), "counters end in _total"
    if metric.unit in metrics.UNIT_SUFFIX:
        assert metric.name.endswith(metrics.UNIT_SUFFIX[metric.unit]), "the unit ends the name"
    if metric.kind == "histogram":
        assert list(metric.boundaries) == sorted(metric.boundaries) and metric.boundaries


def test_only_the_registry_creates_ray_metrics():
    offenders = []
    for path in sources():
        if path == ROOT / "core" / "metrics.py":
            continue
        text = path.read_text()
        if re.search(r"ray\.util\.metrics|from ray\.util import metrics", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"metrics created outside core/metrics.py: {offenders}"


def test_every_recorded_metric_is_declared():
    seen = 0
    for path in sources():
        for call in calls(ast.parse(path.read_text()), "record"):
            first = call.args[0] if call.args else None
            if not (isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)):
                # e.g. record(metric, ...) inside a loop over a declared table: that table is checked below
                assert isinstance(first, ast.Name), f"{path}:{call.lineno}: record() needs a declared metric"
                continue
            assert first.value.id == "metrics", f"{path}:{call.lineno}"
            assert isinstance(getattr(metrics, first.attr, None), metrics.Metric), (
                f"{path}:{call.lineno}: metrics.{first.attr} is not declared in core/metrics.py"
            )
            seen += 1
    assert seen >= 8, "the scan found the record() calls"


def test_record_refuses_undeclared_metrics_and_tags():
    with pytest.raises(ValueError, match="not declared"):
        metrics.record(metrics.Metric("raylm_serve_x", "gauge", "x", ("model",), "x"), 1, {"model": "m"})
    with pytest.raises(ValueError, match="takes tags"):
        metrics.record(metrics.SERVE_BATCH_SIZE, 1, {"run": "m"})


def _literal_head(node: ast.AST) -> str | None:
    """The reason kind a `return False, <string>` gives: its text before ':' or '['."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        first = node.values[0]
        if isinstance(first, ast.FormattedValue):
            return "{" + ast.unparse(first.value) + "}"
        text = first.value
    else:
        return None
    return re.split(r"[:\[]", text)[0]


def test_every_filter_reason_is_declared_by_its_filter():
    tree = ast.parse(Path(filters.__file__).read_text())
    checked = 0
    filter_classes = {c.__name__ for c in filters._all_filters()}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in filter_classes):
        declared = getattr(filters, cls.name).reasons
        for ret in (n for n in ast.walk(cls) if isinstance(n, ast.Tuple) and len(n.elts) == 2):
            if not (isinstance(ret.elts[0], ast.Constant) and ret.elts[0].value is False):
                continue
            head = _literal_head(ret.elts[1])
            if head == "{self.name}":
                subclasses = [c for c in filters._all_filters() if issubclass(c, getattr(filters, cls.name))]
                assert all(c.name in c.reasons for c in subclasses if "name" in c.__dict__), cls.name
            else:
                assert head in declared, f"{cls.name} gives '{head}', declares {declared}"
            checked += 1
    assert checked >= 12


def test_every_reader_reason_is_a_declared_constant():
    """Each `_reject(...)` reason, and each `reason = ...` built for one, starts with a declared constant."""
    tree = ast.parse(Path(readers.__file__).read_text())
    constants = {k for k, v in vars(readers).items() if isinstance(v, str) and v in readers.READ_REASONS}
    assigned = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "reason"
    ]
    passed = [c.args[2] for c in calls(tree, "_reject") if ast.unparse(c.args[2]) != "reason"]
    for reason in assigned + passed:
        head = reason.values[0] if isinstance(reason, ast.JoinedStr) else reason
        head = head.value if isinstance(head, ast.FormattedValue) else head
        assert isinstance(head, ast.Name) and head.id in constants, (
            f"readers.py:{reason.lineno}: a reject reason must start with a declared constant"
        )
    assert len(assigned) + len(passed) >= 12


def test_every_language_sensitive_and_classifier_reason_starts_with_a_declared_constant():
    """Their reasons are f-strings that open with the stage's constant: f"{LANGUAGE}: ...", f"{SENSITIVE}[...]"."""
    for module, declared, at_least in (
        (langid, langid.LANGUAGE_REASONS, 2),
        (sensitive, sensitive.SENSITIVE_REASONS, 1),
        (classify, classify.CLASSIFY_REASONS, 2),
    ):
        constants = {k for k, v in vars(module).items() if isinstance(v, str) and v in declared}
        heads = [
            n.values[0].value.id
            for n in ast.walk(ast.parse(Path(module.__file__).read_text()))
            if isinstance(n, ast.JoinedStr)
            and isinstance(n.values[0], ast.FormattedValue)
            and isinstance(n.values[0].value, ast.Name)
            and n.values[0].value.id.isupper()
        ]
        assert set(heads) <= constants and len(heads) >= at_least, (module.__name__, heads)


def test_drops_of_an_undeclared_reason_fail_the_run():
    drops = {
        readers.DUPLICATE_ID: 2,
        normalize.EMPTY_TEXT: 1,
        sensitive.SENSITIVE: 3,
        langid.LANGUAGE: 5,
        langid.LANGUAGE_CONFIDENCE: 6,
        "min_words": 4,
        classify.MIN_SCORE: 7,
    }
    assert drops_by_stage(drops) == {
        "read": {readers.DUPLICATE_ID: 2},
        "normalize": {normalize.EMPTY_TEXT: 1},
        "sensitive": {sensitive.SENSITIVE: 3},
        "language": {langid.LANGUAGE: 5, langid.LANGUAGE_CONFIDENCE: 6},
        "filters": {"min_words": 4},
        "classifiers": {classify.MIN_SCORE: 7},
    }
    assert drops_by_stage({})["language"] == {}  # every stage named, empty where it dropped nothing
    with pytest.raises(RuntimeError, match="declared by no stage"):
        drops_by_stage({"brand_new_reason": 1})
