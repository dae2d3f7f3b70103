"""A sweep on a tiny model, end to end on the session's Ray: trials run the real training loop, ASHA stops
some early, and the outputs (trials.csv, plots, best_config.yaml, best_adapter/, adapters/) hand the
best adapter on to serving with the logits it had in its trial."""

from __future__ import annotations

import csv
import signal

import pytest
import torch
from safetensors.torch import load_file

from raylm.core import lineage
from raylm.core.artifacts import TUNE, TuneDir
from raylm.core.config import load_config
from tests.tuning.conftest import tiny_sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(ray_cluster, tiny_model_dir, tune_data, tmp_path_factory):
    from raylm.tuning.run import preflight, run

    cfg = tiny_sweep(tiny_model_dir, tune_data, tmp_path_factory.mktemp("sweep") / "run")
    preflight(cfg)
    before = signal.getsignal(signal.SIGINT)
    manifest = run(cfg)
    # Ray Tune leaves its own SIGINT handler behind ("ending the Tune run"); run() must restore ours, or
    # Ctrl-C could not stop the serve stage that `raylm run` starts after tuning.
    assert signal.getsignal(signal.SIGINT) is before
    with open(TuneDir(cfg.tune.output).trials_csv) as f:
        rows = list(csv.DictReader(f))
    return cfg, manifest, rows


def test_a_grid_sweep_runs_every_point_and_asha_stops_some_early(sweep):
    _, manifest, rows = sweep
    assert len(rows) == 6
    points = {(float(r["lr"]), r["target_modules"]) for r in rows}
    assert points == {(lr, m) for lr in (1e-5, 3e-3, 3e-2) for m in ("attention", "all")}
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped, "ASHA stopped no trial"
    assert all(int(r["steps"]) < 12 and "ASHA" in r["stop_reason"] for r in stopped)
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and all(int(r["steps"]) == 12 for r in completed)
    assert manifest["kind"] == TUNE
    assert manifest["summary"]["trials"] == 6
    assert manifest["summary"]["stopped_early"] == len(stopped)
    best = min(completed, key=lambda r: float(r["eval_loss"]))
    assert manifest["summary"]["best_trial"] == best["trial_id"]
    assert float(best["lr"]) > 1e-5  # learning beats not learning


def test_the_outputs_hand_the_best_trial_on(sweep):
    cfg, manifest, _ = sweep
    out = TuneDir(cfg.tune.output)
    best = manifest["summary"]["best_trial"]
    for plot in (out.lr_plot, out.curves_plot):
        with open(plot, "rb") as f:
            assert f.read(8) == PNG
    out.best_adapter.validate_adapter()
    adapters = sorted(p.rsplit("/", 1)[-1] for p in manifest["adapters"])
    assert adapters[0] == f"01-{best}" and len(adapters) == 3
    recipe = load_config(out.best_config)  # a runnable recipe
    trial = lineage.read_manifest(out.trial(best).export.root)["config"]
    assert recipe.stages == ["train"]
    assert recipe.train.schedule.lr == trial["schedule"]["lr"]
    assert recipe.train.lora.target_modules == trial["lora"]["target_modules"]
    assert recipe.train.model.path == cfg.tune.model and recipe.train.max_steps == 12


def test_the_best_adapter_gives_the_logits_it_had_in_its_trial(sweep, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raylm.serving.app import adapter_catalog
    from raylm.serving.config import ServeConfig
    from raylm.serving.engine import Engine

    cfg, manifest, _ = sweep
    out = TuneDir(cfg.tune.output)
    best = manifest["summary"]["best_trial"]
    probe = load_file(out.trial(best).probe_logits)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out.best_adapter.root).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    # And through serving: the sweep's adapters folder, addressed by name.
    serve = ServeConfig.model_validate({"model": tiny_model_dir, "adapters": {"dirs": [out.adapters]}})
    catalog = adapter_catalog(serve)
    engine = Engine(tiny_model_dir, dtype="float32", device="cpu")
    for name, path in catalog.items():
        engine.load_adapter(name, path)
    served = engine._forward(f"01-{best}", input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(served, probe["logits"], rtol=1e-5, atol=1e-5)
    base_logits = engine._forward(None, input_ids=probe["input_ids"]).logits
    assert not torch.allclose(base_logits, probe["logits"], atol=1e-3)  # the adapter changes something


def test_mlflow_holds_the_sweep_and_one_child_run_per_trial(sweep):
    from mlflow import MlflowClient

    from raylm.core import tracking
    from raylm.core.config import dump_config

    cfg, manifest, rows = sweep
    client = MlflowClient(tracking.local_store(cfg.run_dir))
    experiment = client.get_experiment_by_name(cfg.name).experiment_id
    (parent,) = client.search_runs([experiment], "tags.`raylm.stage` = 'tune'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params == tracking.flatten(dump_config(cfg.tune))
    summary = {k: v for k, v in manifest["summary"].items() if isinstance(v, (int, float))}
    assert {k: parent.data.metrics[f"summary.{k}"] for k in summary} == pytest.approx(summary)
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {c.data.tags["raylm.trial_id"]: c for c in children}
    assert len(children) == len(rows) and set(by_trial) == {r["trial_id"] for r in rows}
    for row in rows:
        child = by_trial[row["trial_id"]]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["lr"]) == float(row["lr"])
        assert child.data.params["target_modules"] == row["target_modules"]
        history = client.get_metric_history(child.info.run_id, "eval_loss")
        assert history and max(m.step for m in history) == int(row["steps"])


def test_a_finished_sweep_is_not_run_again(sweep):
    from raylm.tuning.run import run

    cfg, manifest, _ = sweep
    assert run(cfg)["created_at"] == manifest["created_at"]
