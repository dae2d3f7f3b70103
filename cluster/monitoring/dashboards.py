"""The Grafana dashboards, one per stage, written out as a table of panels; `python dashboards.py` writes
grafana/dashboards/*.json (tests/monitoring checks the JSON files are what this table gives, and that
every query names a metric of core/metrics.py or one of Ray's own listed in ray_metrics.json).

raylm's metrics reach Prometheus as ray_<name>, one series per Ray worker process, so panels aggregate
(max by run for gauges, sum for counters). `$run` is a dashboard variable over the runs' names.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards"
RUN = 'run=~"$run"'
# (title, [(legend, expr)], unit, kind) with kind one of timeseries, stat, bargauge
Panel = tuple[str, list[tuple[str, str]], str, str]


def quantiles(metric: str, by: str, sel: str = "", scale: str = "") -> list[tuple[str, str]]:
    """p50 and p95 of a histogram over the last rate interval."""
    rate = f"rate({metric}_bucket{{{sel}}}[$__rate_interval])"
    return [
        (f"p{q} {{{{{by}}}}}", f"histogram_quantile(0.{q}, sum by (le, {by}) ({rate})){scale}")
        for q in (50, 95)
    ]


CURATION: list[Panel] = [
    (
        "Documents into each stage",
        [("{{stage}}", f"max by (stage) (ray_raylm_curate_stage_documents_in{{{RUN}}})")],
        "short",
        "bargauge",
    ),
    (
        "Documents out of each stage",
        [("{{stage}}", f"max by (stage) (ray_raylm_curate_stage_documents_out{{{RUN}}})")],
        "short",
        "bargauge",
    ),
    (
        "Drops by stage and reason",
        [("{{stage}}: {{reason}}", f"max by (stage, reason) (ray_raylm_curate_dropped_documents{{{RUN}}})")],
        "short",
        "bargauge",
    ),
    (
        "Seconds per phase",
        [("{{stage}}", f"max by (stage) (ray_raylm_curate_stage_seconds{{{RUN}}})")],
        "s",
        "bargauge",
    ),
    (
        "Duplicate ratio",
        [("{{run}}", f"max by (run) (ray_raylm_curate_duplicate_ratio{{{RUN}}})")],
        "percentunit",
        "stat",
    ),
    (
        "Input MB/s",
        [("{{run}}", f"max by (run) (ray_raylm_curate_megabytes_per_second{{{RUN}}})")],
        "MBs",
        "stat",
    ),
    (
        "Documents in / out",
        [
            ("in {{run}}", f"max by (run) (ray_raylm_curate_documents_in{{{RUN}}})"),
            ("out {{run}}", f"max by (run) (ray_raylm_curate_documents_out{{{RUN}}})"),
        ],
        "short",
        "stat",
    ),
    ("Packed tokens", [("{{run}}", f"max by (run) (ray_raylm_curate_tokens{{{RUN}}})")], "short", "stat"),
    (
        "Ray: CPU utilization per node",
        [("{{instance}}", "avg by (instance) (ray_node_cpu_utilization)")],
        "percent",
        "timeseries",
    ),
    (
        "Ray: memory used per node",
        [("{{instance}}", "sum by (instance) (ray_node_mem_used)")],
        "bytes",
        "timeseries",
    ),
]

TRAINING: list[Panel] = [
    ("Training loss", [("{{run}}", f"max by (run) (ray_raylm_train_loss{{{RUN}}})")], "short", "timeseries"),
    ("Eval loss", [("{{run}}", f"max by (run) (ray_raylm_train_eval_loss{{{RUN}}})")], "short", "timeseries"),
    (
        "Eval perplexity",
        [("{{run}}", f"max by (run) (ray_raylm_train_eval_perplexity{{{RUN}}})")],
        "short",
        "timeseries",
    ),
    (
        "Tokens / s (all workers)",
        [("{{run}}", f"max by (run) (ray_raylm_train_tokens_per_second{{{RUN}}})")],
        "short",
        "timeseries",
    ),
    ("MFU", [("{{run}}", f"max by (run) (ray_raylm_train_mfu{{{RUN}}})")], "percentunit", "timeseries"),
    ("Step time", quantiles("ray_raylm_train_step_seconds", "run", RUN), "s", "timeseries"),
    ("Checkpoint time", quantiles("ray_raylm_train_checkpoint_seconds", "run", RUN), "s", "timeseries"),
    ("Steps taken", [("{{run}}", f"sum by (run) (ray_raylm_train_steps_total{{{RUN}}})")], "short", "stat"),
    (
        "Restarts / steps lost / NaN-loss steps",
        [
            ("restarts {{run}}", f"sum by (run) (ray_raylm_train_restarts_total{{{RUN}}})"),
            ("steps lost {{run}}", f"sum by (run) (ray_raylm_train_steps_lost_total{{{RUN}}})"),
            ("NaN-loss steps {{run}}", f"sum by (run) (ray_raylm_train_nonfinite_loss_steps_total{{{RUN}}})"),
        ],
        "short",
        "stat",
    ),
    (
        "Learning rate",
        [("{{run}}", f"max by (run) (ray_raylm_train_learning_rate{{{RUN}}})")],
        "short",
        "timeseries",
    ),
    (
        "Gradient norm",
        [("{{run}}", f"max by (run) (ray_raylm_train_grad_norm{{{RUN}}})")],
        "short",
        "timeseries",
    ),
    (
        "Ray: GPU utilization per node",
        [("{{instance}}", "avg by (instance) (ray_node_gpus_utilization)")],
        "percent",
        "timeseries",
    ),
    (
        "Ray: CPU utilization per node",
        [("{{instance}}", "avg by (instance) (ray_node_cpu_utilization)")],
        "percent",
        "timeseries",
    ),
]

TUNING: list[Panel] = [
    (
        "Trials running",
        [("{{run}}", f"sum by (run) (ray_raylm_tune_trials_running{{{RUN}}})")],
        "short",
        "timeseries",
    ),
    (
        "Trials ended, by status",
        [("{{status}}", f"sum by (status) (ray_raylm_tune_trials_total{{{RUN}}})")],
        "short",
        "bargauge",
    ),
    (
        "Best eval loss so far",
        [("{{run}}", f"min by (run) (ray_raylm_tune_best_eval_loss{{{RUN}}})")],
        "short",
        "timeseries",
    ),
    ("Trial wall time", quantiles("ray_raylm_tune_trial_seconds", "run", RUN), "s", "timeseries"),
    ("Trials' training loss", [("{{run}}", "max by (run) (ray_raylm_train_loss)")], "short", "timeseries"),
    (
        "Ray: CPU utilization per node",
        [("{{instance}}", "avg by (instance) (ray_node_cpu_utilization)")],
        "percent",
        "timeseries",
    ),
]

SERVING: list[Panel] = [
    (
        "Requests / s by route and status",
        [
            (
                "{{route}} {{status}}",
                "sum by (route, status) (rate(ray_raylm_serve_requests_total[$__rate_interval]))",
            )
        ],
        "reqps",
        "timeseries",
    ),
    (
        "Requests by route and status",
        [("{{route}} {{status}}", "sum by (route, status) (ray_raylm_serve_requests_total)")],
        "short",
        "bargauge",
    ),
    (
        "Time to first token",
        quantiles("ray_raylm_serve_time_to_first_token_seconds", "model"),
        "s",
        "timeseries",
    ),
    (
        "Inter-token latency",
        quantiles("ray_raylm_serve_inter_token_latency_seconds", "model"),
        "s",
        "timeseries",
    ),
    ("Queue wait", quantiles("ray_raylm_serve_queue_wait_seconds", "model"), "s", "timeseries"),
    (
        "Mean batch size",
        [
            (
                "{{model}}",
                "sum by (model) (rate(ray_raylm_serve_batch_size_sum[$__rate_interval]))"
                " / sum by (model) (rate(ray_raylm_serve_batch_size_count[$__rate_interval]))",
            )
        ],
        "short",
        "timeseries",
    ),
    ("Batch size", quantiles("ray_raylm_serve_batch_size", "model"), "short", "timeseries"),
    (
        "Decode tokens / s",
        [("{{model}}", "sum by (model) (ray_raylm_serve_tokens_per_second)")],
        "short",
        "timeseries",
    ),
    (
        "Completion tokens",
        [("{{model}}", "sum by (model) (ray_raylm_serve_tokens_generated_total)")],
        "short",
        "bargauge",
    ),
    (
        "Adapter loads",
        [("{{model}}", "sum by (model) (ray_raylm_serve_adapter_loads_total)")],
        "short",
        "bargauge",
    ),
    (
        "Ray Serve: healthy replicas",
        [
            (
                "{{application}}/{{deployment}}",
                "sum by (application, deployment) (ray_serve_deployment_replica_healthy)",
            )
        ],
        "short",
        "timeseries",
    ),
    (
        "Ray Serve: replica processing latency",
        quantiles("ray_serve_deployment_processing_latency_ms", "deployment", scale=" / 1000"),
        "s",
        "timeseries",
    ),
    (
        "Ray Serve: replica starts",
        [("{{deployment}}", "count by (deployment) (ray_serve_deployment_replica_starts_total)")],
        "short",
        "stat",
    ),
]

# uid -> (title, panels, the metric whose `run` label values fill the $run variable, or None)
DASHBOARDS = {
    "raylm-curation": ("raylm: curation", CURATION, "ray_raylm_curate_runs_total"),
    "raylm-training": ("raylm: training", TRAINING, "ray_raylm_train_steps_total"),
    "raylm-tuning": ("raylm: tuning", TUNING, "ray_raylm_tune_trials_total"),
    "raylm-serving": ("raylm: serving", SERVING, None),
}
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yml


def panel_json(i: int, panel: Panel) -> dict:
    title, targets, unit, kind = panel
    width = 8 if kind != "timeseries" else 12
    per_row = 24 // width
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": (i % per_row) * width, "y": (i // per_row) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}} if kind != "timeseries" else {},
        "targets": [
            {"refId": chr(65 + j), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for j, (legend, expr) in enumerate(targets)
        ],
    }


def run_variable(metric: str) -> dict:
    return {
        "name": "run",
        "label": "run",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": f"label_values({metric}, run)", "refId": "run"},
        "definition": f"label_values({metric}, run)",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }


def dashboard_json(uid: str) -> dict:
    title, panels, run_metric = DASHBOARDS[uid]
    return {
        "uid": uid,
        "title": title,
        "tags": ["raylm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [run_variable(run_metric)] if run_metric else []},
        "panels": [panel_json(i, p) for i, p in enumerate(panels)],
    }


def write_all() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid in DASHBOARDS:
        path = OUT / f"{uid}.json"
        path.write_text(json.dumps(dashboard_json(uid), indent=2) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_all():
        print(p)
