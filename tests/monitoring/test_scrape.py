"""Platform metrics end to end: `raylm monitor` runs a real Prometheus against the test session's Ray (found
through Ray's service-discovery file); a small curation, a training run that fails and restarts, a
two-trial LoRA sweep and a served model with an adapter run on that Ray; Prometheus's query API must
return each platform metric with the value the job itself logged (manifest, history rows, trials.csv,
HTTP responses). With RAYLM_RENDER_DASHBOARDS=DIR it also renders the dashboards into DIR.

Ray exports a metric as ray_<name>, one series per worker process (a WorkerId label): the queries sum
over processes, and the serving checks use a model id of their own (other modules serve on this Ray too).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from collections import Counter

import pytest
import requests
from prom import NEEDS_PROMETHEUS, Prometheus, render_dashboards, write_service_discovery

from raylm.core import metrics
from raylm.core.config import build_config
from raylm.core.lineage import read_manifest
from tests.synthetic import document

pytestmark = [pytest.mark.slow, NEEDS_PROMETHEUS]
RUN, SWEEP = "obs", "obs-sweep"  # the runs' names (their `run` tag)
MODEL, ADAPTER = "obs-tiny", "obs-lora"  # serving's `model` tags
VLLM_MODEL = "obs-vllm"  # the vLLM engine's


def m(metric: metrics.Metric, suffix: str = "") -> str:
    return metrics.exported_name(metric) + suffix


@pytest.fixture(scope="module")
def prom(ray_cluster, tmp_path_factory):
    from tests.serving.conftest import free_port

    session = write_service_discovery(ray_cluster)
    p = Prometheus(session, free_port(), str(tmp_path_factory.mktemp("prometheus")))
    yield p
    assert p.stop() == 0, "raylm monitor stops cleanly on Ctrl-C"


# ---- the jobs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curated(ray_cluster, tmp_path_factory):
    from raylm.pipelines.run import run

    rng = random.Random(3)
    corpus = tmp_path_factory.mktemp("obs-corpus")
    docs = [{"id": f"d{i:03d}", "text": document(rng)} for i in range(60)]
    dups = [{"id": f"copy-{d['id']}", "text": d["text"] + " \n"} for d in docs[:6]]
    lines = [json.dumps(d) for d in docs + dups] + [
        "{broken json",
        json.dumps({"id": "s", "text": "Too short."}),
    ]
    (corpus / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    data = {"sources": [{"path": str(corpus)}], "seq_len": 32, "tokenizer": {"vocab_size": 400}}
    data["near_dedup"] = {"enabled": False}  # exact dedup is enough here, and MinHash costs a minute
    cfg = build_config({"name": RUN, "run_dir": str(tmp_path_factory.mktemp("obs-run")), "data": data})
    run(cfg)
    return read_manifest(cfg.data.output) | {"dir": cfg.data.output}


class FailAtStep:
    """A report function that raises at one step (after that step's metrics): the attempt dies there."""

    def __init__(self, step: int | None):
        self.step, self.rows = step, []

    def __call__(self, reported: dict, checkpoint_dir: str | None) -> None:
        if reported["step"] == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")
        self.rows.append(reported)


@pytest.fixture(scope="module")
def trained(curated, tmp_path_factory):
    """Attempt 0 checkpoints at step 2 and dies after step 3; attempt 1 resumes at 2 and ends at 4."""
    from raylm.training.loop import train_in_process
    from raylm.training.run import loop_config, read_curated

    root = tmp_path_factory.mktemp("obs-train")
    train = {
        "data_dir": curated["dir"],
        "output": str(root / "train"),
        "model": {
            "from_scratch": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_layers": 1,
                "num_heads": 2,
                "num_kv_heads": 2,
            }
        },
        "num_workers": 1,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "max_steps": 4,
        "eval_every": 2,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2},
    }
    cfg = build_config({"name": RUN, "run_dir": str(root), "seed": 0, "stages": ["train"], "train": train})
    config = loop_config(
        cfg.train, 0, read_curated(curated["dir"]), None, "in_process", str(root / "ck"), RUN
    )
    first = FailAtStep(3)
    with pytest.raises(RuntimeError, match="injected failure"):
        train_in_process(config, first)
    second = FailAtStep(None)
    history = train_in_process(config, second)
    assert history[-1]["attempt"] == 1 and second.rows[0]["step"] == 3
    return {"history": history, "steps_recorded": len(first.rows) + 1 + len(second.rows)}


@pytest.fixture(scope="module")
def served(ray_cluster, prom, tiny_model_dir, tmp_path_factory):
    """One app (base + an adapter); three completions, one bad request, one unknown path."""
    from ray import serve

    from raylm.serving.config import ServeConfig
    from raylm.serving.run import start
    from tests.serving.conftest import build_adapter, free_port

    adapter = build_adapter(tiny_model_dir, tmp_path_factory.mktemp("obs-adapter") / ADAPTER, seed=5)
    cfg = ServeConfig(
        model=tiny_model_dir,
        adapters={"paths": {ADAPTER: adapter}},
        app_name="obs",
        http={"port": free_port(), "route_prefix": "/"},
    )
    url = start(cfg, MODEL)
    requests.get(url + "/models", timeout=120).raise_for_status()  # the replica is up
    before = {s: prom.value(requests_expr(s)) or 0.0 for s in ("200", "400")}
    usage = []
    for model in (MODEL, MODEL, ADAPTER):
        body = {"model": model, "prompt": "the quick brown", "max_tokens": 6, "temperature": 0}
        r = requests.post(url + "/completions", json=body, timeout=120)
        r.raise_for_status()
        usage.append(r.json()["usage"]["completion_tokens"])
    assert requests.post(url + "/completions", json={"model": MODEL}, timeout=60).status_code == 400
    assert requests.get(url + "/no/such/route", timeout=60).status_code == 404
    yield {"usage": usage, "before": before, "url": url}
    # Serve's HTTP proxy keeps the first app's port for the whole Ray session: shut Serve down, as the
    # serving tests do, so the next module's app gets the port it asks for.
    serve.shutdown()


@pytest.fixture(scope="module")
def served_vllm(served, tiny_tokenizer_dir, tmp_path_factory):
    """The same HTTP surface on the vLLM engine (a head size its CPU kernels take), next to `served` on
    the port Serve's proxy already holds: two completions, one of them streamed."""
    from raylm.serving.config import ServeConfig
    from raylm.serving.run import start
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("obs-vllm"), num_attention_heads=2)
    port = int(served["url"].split(":")[2].split("/")[0])
    cfg = ServeConfig(
        model=model,
        engine="vllm",
        vllm={"kv_cache_gib": 0.25, "enforce_eager": True},
        app_name="obs-vllm",
        http={"port": port, "route_prefix": "/vllm"},
    )
    url = start(cfg, VLLM_MODEL)
    body = {"model": VLLM_MODEL, "prompt": "the quick brown", "max_tokens": 5, "temperature": 0}
    whole = requests.post(url + "/completions", json=body, timeout=120)
    whole.raise_for_status()
    stream = requests.post(url + "/completions", json={**body, "stream": True}, timeout=120)
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    return {"tokens": whole.json()["usage"]["completion_tokens"] + 5}  # greedy, no eos in 5 tokens here


@pytest.fixture(scope="module")
def swept(prom, tiny_tokenizer_dir, tiny_model_dir, tmp_path_factory):
    """Two LoRA trials of 4 steps (ASHA may stop one at its first evaluation); trials.csv as rows."""
    from raylm.core.artifacts import TuneDir
    from raylm.tuning.run import run
    from tests.training.conftest import build_curated
    from tests.tuning.conftest import sweep_recipe

    root = tmp_path_factory.mktemp("obs-tune")
    data = build_curated(tiny_tokenizer_dir, root / "curated", train_rows=32, eval_rows=8)
    space = {"lr": {"choice": [3e-3, 3e-2]}, "rank": {"choice": [4]}, "alpha": {"tied": 2}}
    trial = {"max_steps": 4, "eval_every": 2, "eval_batches": 2, "checkpoint": {"every_steps": 2}}
    recipe = sweep_recipe(tiny_model_dir, data, root, space=space, trial=trial)
    cfg = build_config(recipe | {"name": SWEEP})
    run(cfg)
    with open(TuneDir(cfg.tune.output).trials_csv) as f:
        return list(csv.DictReader(f))


def requests_expr(status: str, route: str = "/v1/completions") -> str:
    return f'sum({m(metrics.SERVE_REQUESTS)}{{route="{route}",status="{status}"}})'


# ---- the checks ----------------------------------------------------------------------------------------
def check(prom: Prometheus, expr: str, expected: float, rel: float = 1e-6) -> None:
    got = prom.wait_value(expr, expected, rel=rel)
    assert got is not None and abs(got - expected) <= rel * max(1.0, abs(expected)), (
        f"{expr}: Prometheus has {got}, the job logged {expected}"
    )


def test_curation_metrics(prom, curated):
    c, run = curated["counts"], f'{{run="{RUN}"}}'
    check(prom, f"sum({m(metrics.CURATE_DOCUMENTS_IN)}{run})", c["documents_read"])
    check(prom, f"sum({m(metrics.CURATE_DOCUMENTS_OUT)}{run})", c["after_near_dedup"])
    check(prom, f"sum({m(metrics.CURATE_TOKENS)}{run})", c["packed_tokens"])
    check(prom, f"sum({m(metrics.CURATE_RUNS)}{run})", 1)
    stage = m(metrics.CURATE_STAGE_DOCUMENTS_OUT)
    check(prom, f'sum({stage}{{run="{RUN}",stage="quality filters"}})', c["after_filters"])
    check(prom, f'sum({stage}{{run="{RUN}",stage="exact dedup"}})', c["after_exact_dedup"])
    stage_in = m(metrics.CURATE_STAGE_DOCUMENTS_IN)
    check(prom, f'sum({stage_in}{{run="{RUN}",stage="read"}})', c["rows_read"])
    dropped = m(metrics.CURATE_DROPPED_DOCUMENTS)
    for reason, n in curated["drops"]["filters"].items():
        check(prom, f'sum({dropped}{{run="{RUN}",stage="quality filters",reason="{reason}"}})', n)
    for reason, n in curated["drops"]["read"].items():
        check(prom, f'sum({dropped}{{run="{RUN}",stage="read",reason="{reason}"}})', n)
    exact = curated["dedup"]["exact_duplicates"]
    assert exact >= 6, "the corpus's copies are exact duplicates once normalized"
    check(prom, f'sum({dropped}{{run="{RUN}",stage="exact dedup",reason="exact_duplicate"}})', exact)
    dups = c["after_filters"] - c["after_near_dedup"]
    check(prom, f"sum({m(metrics.CURATE_DUPLICATE_RATIO)}{run})", dups / c["after_filters"])
    check(
        prom, f"sum({m(metrics.CURATE_MEGABYTES_PER_SECOND)}{run})", curated["timings"]["mb_per_s"], rel=0.01
    )


def test_training_metrics(prom, trained):
    last, run = trained["history"][-1], f'{{run="{RUN}"}}'
    check(prom, f"sum({m(metrics.TRAIN_LOSS)}{run})", last["loss"])
    check(prom, f"sum({m(metrics.TRAIN_EVAL_LOSS)}{run})", last["eval_loss"])
    check(prom, f"sum({m(metrics.TRAIN_TOKENS_PER_SECOND)}{run})", last["tokens_per_s"])
    check(prom, f"sum({m(metrics.TRAIN_MFU)}{run})", last["mfu"])
    check(prom, f"sum({m(metrics.TRAIN_STEPS)}{run})", trained["steps_recorded"])
    check(prom, f"sum({m(metrics.TRAIN_STEP_SECONDS, '_count')}{run})", trained["steps_recorded"])
    assert prom.value(f"sum({m(metrics.TRAIN_STEP_SECONDS, '_sum')}{run})") > 0
    check(prom, f"sum({m(metrics.TRAIN_CHECKPOINT_SECONDS, '_count')}{run})", 2)  # steps 2 and 4
    check(prom, f"sum({m(metrics.TRAIN_RESTARTS)}{run})", 1)
    check(prom, f"sum({m(metrics.TRAIN_STEPS_LOST)}{run})", 1)  # step 3 redone


def test_a_nan_loss_is_counted(prom):
    """Ray exports no gauge set to NaN, so a NaN loss step is counted (what RaylmTrainingLossNaN reads)."""
    from raylm.training.progress import emit_metrics

    for step in (1, 2):
        emit_metrics({"run": "obs-nan", "step": step, "loss": math.nan, "step_time_s": 0.1}, rank=0)
    check(prom, f'sum({m(metrics.TRAIN_NONFINITE_LOSS_STEPS)}{{run="obs-nan"}})', 2)
    assert prom.value(f'sum({m(metrics.TRAIN_LOSS)}{{run="obs-nan"}})') is None


def test_tuning_metrics(prom, swept):
    run = f'{{run="{SWEEP}"}}'
    for status, n in Counter(r["status"] for r in swept).items():
        check(prom, f'sum({m(metrics.TUNE_TRIALS)}{{run="{SWEEP}",status="{status}"}})', n)
    # Exported and back to 0 at the end. (Whether an export caught it at 1 or 2 depends on how the
    # trials' seconds fall against Ray's export interval, so the peak is not asserted.)
    check(prom, f"sum({m(metrics.TUNE_TRIALS_RUNNING)}{run})", 0)
    completed = [float(r["eval_loss"]) for r in swept if r["status"] == "completed"]
    best = min(x for x in completed if math.isfinite(x))
    check(prom, f"min({m(metrics.TUNE_BEST_EVAL_LOSS)}{run})", best, rel=1e-4)
    check(prom, f"sum({m(metrics.TUNE_TRIAL_SECONDS, '_count')}{run})", len(swept))


def test_serving_metrics(prom, served):
    usage, before = served["usage"], served["before"]
    check(prom, requests_expr("200"), before["200"] + 3)
    check(prom, requests_expr("400"), before["400"] + 1)
    assert prom.wait_value(requests_expr("404", "unmatched"), 1, timeout=30) >= 1
    model = f'{{model=~"{MODEL}|{ADAPTER}"}}'
    check(prom, f"sum({m(metrics.SERVE_TOKENS_GENERATED)}{model})", sum(usage))
    check(prom, f"sum({m(metrics.SERVE_TIME_TO_FIRST_TOKEN_SECONDS, '_count')}{model})", 3)
    check(prom, f"sum({m(metrics.SERVE_QUEUE_WAIT_SECONDS, '_count')}{model})", 3)
    # one gap between each two tokens of a request
    check(prom, f"sum({m(metrics.SERVE_INTER_TOKEN_LATENCY_SECONDS, '_count')}{model})", sum(usage) - 3)
    check(prom, f'sum({m(metrics.SERVE_ADAPTER_LOADS)}{{model="{ADAPTER}"}})', 1)
    assert prom.value(f"sum({m(metrics.SERVE_BATCH_SIZE, '_count')}{model})") >= sum(usage) - 3
    # A gauge's series goes stale in Prometheus once Ray stops exporting it (after the requests), so
    # look back over the window rather than at the instant.
    rate = prom.value(f"max(max_over_time({m(metrics.SERVE_TOKENS_PER_SECOND)}{model}[10m]))")
    assert rate is not None and rate > 0


def test_vllm_engine_metrics(prom, served_vllm):
    """The registry's serving metrics from the vLLM engine's routes, and vLLM's own metrics beside them."""
    model = f'{{model="{VLLM_MODEL}"}}'
    check(prom, f"sum({m(metrics.SERVE_TOKENS_GENERATED)}{model})", served_vllm["tokens"])
    check(prom, f"sum({m(metrics.SERVE_TIME_TO_FIRST_TOKEN_SECONDS, '_count')}{model})", 1)  # the stream
    check(
        prom,
        f'sum({{__name__=~"ray_vllm_generation_tokens(_total)?",model_name="{VLLM_MODEL}"}})',
        served_vllm["tokens"],
    )


@pytest.mark.skipif(not os.environ.get("RAYLM_RENDER_DASHBOARDS"), reason="renders docs/monitoring on demand")
def test_render_dashboards(prom, curated, trained, swept, served):
    """docs/monitoring/*.png from this run, after a minute of steady traffic (a rate() needs two samples
    of a series that moves)."""
    rng, deadline = random.Random(0), time.time() + 60
    while time.time() < deadline:
        for model in (MODEL, ADAPTER):
            body = {"model": model, "prompt": "the quick", "max_tokens": rng.randint(4, 16), "temperature": 0}
            requests.post(served["url"] + "/completions", json=body, timeout=120)
        if rng.random() < 0.2:
            requests.post(served["url"] + "/completions", json={"model": MODEL}, timeout=60)
        time.sleep(rng.uniform(0.5, 2))
    out = os.environ["RAYLM_RENDER_DASHBOARDS"]
    paths = render_dashboards(prom.url, out, prom.started)
    assert len(paths) == 4 and all(p.stat().st_size < 300_000 for p in paths)
