"""The monitoring files without a cluster: every Grafana query names a metric that core/metrics.py declares
(as Ray exports it) or one of Ray's own listed in ray_metrics.json (and defined where that file says);
the dashboards are what dashboards.py writes; the alert rules parse and fire on the series they are
meant for (promtool check / test rules); `raylm monitor`'s generated config is valid."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from raylm.cluster import monitor
from raylm.core import metrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "cluster" / "monitoring"
BOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
RAY_METRICS = {m["exported"]: m for m in json.loads((MONITORING / "ray_metrics.json").read_text())["metrics"]}
PROMQL_WORDS = {
    *("sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "abs"),
    *("last_over_time", "max_over_time", "and", "or", "unless", "offset", "bool", "inf", "nan"),
}
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression (label matchers, ranges and grouping labels removed)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w.lower() not in PROMQL_WORDS}


def declared(name: str) -> bool:
    """A raylm metric as Ray exports it (ray_ prefix; a histogram's _bucket/_sum/_count), or a listed Ray one."""
    if name in RAY_METRICS:
        return True
    base = name.removeprefix("ray_")
    if not name.startswith("ray_"):
        return False
    for suffix in ("_bucket", "_sum", "_count"):
        m = metrics.REGISTRY.get(base.removesuffix(suffix))
        if base.endswith(suffix) and m is not None and m.kind == "histogram":
            return True
    return base in metrics.REGISTRY and metrics.REGISTRY[base].kind != "histogram"


def board_queries(board: dict) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    return exprs + [v["query"]["query"] for v in board["templating"]["list"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_metric_name_extraction():
    expr = 'histogram_quantile(0.95, sum by (le, run) (rate(ray_a_bucket{run=~"$run"}[$__rate_interval]))) / ray_b'
    assert metric_names(expr) == {"ray_a_bucket", "ray_b"}
    assert not declared("ray_raylm_serve_batch_size") and declared("ray_raylm_serve_batch_size_count")
    assert not declared("raylm_train_loss") and declared("ray_raylm_train_loss")


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_every_panel_queries_declared_metrics(path):
    board = json.loads(path.read_text())
    assert board["panels"] and all(p["targets"] for p in board["panels"])
    for expr in board_queries(board):
        names = metric_names(
            expr.replace("label_values(", "(").split(",")[0] if "label_values" in expr else expr
        )
        assert names, f"{path.name}: no metric in {expr}"
        unknown = [n for n in names if not declared(n)]
        assert not unknown, f"{path.name}: {unknown} in {expr} are not declared in core/metrics.py nor listed"


def test_alert_rules_query_declared_metrics():
    for expr in alert_exprs():
        unknown = [n for n in metric_names(expr) if not declared(n)]
        assert not unknown, f"alerts.yml: {unknown} in {expr}"


def test_every_platform_metric_is_on_a_dashboard():
    used = {n for p in BOARDS for e in board_queries(json.loads(p.read_text())) for n in metric_names(e)}
    shown = {re.sub(r"^ray_|_(bucket|sum|count)$", "", n) for n in used}
    assert set(metrics.REGISTRY) - shown == set()


def test_listed_ray_metrics_are_defined_by_ray():
    site = Path(ray.__file__).parent
    for m in RAY_METRICS.values():
        assert f'"{m["defined_as"]}"' in (site / m["source"]).read_text(), m
        assert m["exported"].startswith("ray_" + m["defined_as"]), m


def test_dashboards_are_what_the_table_writes():
    spec = importlib.util.spec_from_file_location("dashboards", MONITORING / "dashboards.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert [p.stem for p in BOARDS] == sorted(table.DASHBOARDS)
    for path in BOARDS:
        assert json.loads(path.read_text()) == table.dashboard_json(path.stem), f"rerun {spec.origin}"
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert table.DATASOURCE["uid"] == datasource["datasources"][0]["uid"]


@needs_promtool
def test_alert_rules_parse_and_fire():
    check = subprocess.run(
        ["promtool", "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert b"SUCCESS: 4 rules found" in check.stdout
    unit = subprocess.run(
        ["promtool", "test", "rules", str(Path(__file__).parent / "alerts_test.yml")], capture_output=True
    )
    assert unit.returncode == 0, unit.stdout.decode() + unit.stderr.decode()


@needs_promtool
def test_shipped_and_generated_configs_are_valid(tmp_path):
    session = tmp_path / "session_x"
    session.mkdir()
    (session / monitor.SD_FILE).write_text('[{"labels": {"job": "ray"}, "targets": ["127.0.0.1:1"]}]')
    generated = monitor.write_config(monitor.session_dir(str(session)), str(tmp_path / "out"), "5s")
    cfg = yaml.safe_load(Path(generated).read_text())
    assert cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(session / monitor.SD_FILE)]
    for path in (MONITORING / "prometheus.yml", Path(generated)):
        out = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True)
        assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def test_monitor_refuses_a_session_without_discovery_file(tmp_path):
    from raylm.core.errors import InputError

    with pytest.raises(InputError, match=r"prom_metrics_service_discovery\.json"):
        monitor.session_dir(str(tmp_path))
    with pytest.raises(InputError, match="apt-get install prometheus"):
        monitor.prometheus_binary(str(tmp_path / "no-such-prometheus"))
