"""core/tracking.py against a real MLflow store (sqlite, as the default), no Ray: a stage run's params,
status and artifacts; the rank-0 step logger; nested trial runs; a disabled or unreachable store never
stopping a run; credentials refused in recipes. The train and tune stages' runs are checked in
tests/training/test_train_ray.py and tests/tuning/test_sweep.py on the runs those tests make anyway."""

from __future__ import annotations

import logging
import socket

import pytest
import yaml
from mlflow import MlflowClient

from raylm.core import tracking
from raylm.core.cli import main
from raylm.core.config import build_config


def config(tmp_path, **tracking_section):
    return build_config(
        {"name": "demo", "stages": [], "run_dir": str(tmp_path / "run"), "tracking": tracking_section}
    )


def stored(tracker: tracking.Tracker):
    return MlflowClient(tracking_uri=tracker.ref.uri).get_run(tracker.run_id)


def test_a_stage_run_holds_params_steps_artifacts_and_status(tmp_path):
    cfg = config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"final": {"loss": 1.5, "step": 3, "ok": true}}')
    params = {"lr": 0.01, "model": {"layers": [1, 2]}, "note": "x" * 7000}
    with tracking.stage_run(cfg, "train", params, [], str(tmp_path / "out")) as tracker:
        steps = tracking.StepLogger(tracker.ref_dict(), rank=0)
        for step in (1, 2, 3):
            steps.log({"step": step, "loss": 2.0 / step, "lr": 0.01, "t_wall": 1e9, "attempt": 0})
        steps.flush()
        tracking.StepLogger(tracker.ref_dict(), rank=1).log({"step": 1, "loss": 9.0})  # rank 1 logs nothing
        tracker.finish_stage(
            {"final": {"loss": 1.5, "step": 3, "ok": True}}, "final", str(tmp_path / "out"), []
        )
    run = stored(tracker)
    assert run.info.status == "FINISHED"
    assert (
        run.info.experiment_id == MlflowClient(tracker.ref.uri).get_experiment_by_name("demo").experiment_id
    )
    assert run.data.params["lr"] == "0.01" and run.data.params["model.layers"] == "[1, 2]"
    assert len(run.data.params["note"]) == tracking.MAX_PARAM_CHARS
    assert run.data.params["note"].endswith(tracking.TRUNCATED)
    assert run.data.metrics == {"loss": 2.0 / 3, "lr": 0.01, "final.loss": 1.5, "final.step": 3.0}
    history = MlflowClient(tracker.ref.uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert run.data.tags["raylm.stage"] == "train" and run.data.tags["raylm.run_dir"] == cfg.run_dir
    assert run.info.artifact_uri.startswith(f"file://{cfg.run_dir}/mlflow/artifacts")
    assert (tmp_path / "run" / "mlflow" / "mlflow.db").is_file()
    assert [a.path for a in MlflowClient(tracker.ref.uri).list_artifacts(tracker.run_id)] == ["manifest.json"]


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_stage_that_raises_ends_its_run_failed_or_killed(tmp_path, error, status):
    with pytest.raises(error), tracking.stage_run(config(tmp_path), "tune", {}, [], str(tmp_path)) as tracker:
        raise error()
    assert stored(tracker).info.status == status


def test_a_trial_run_is_nested_and_found_again_when_its_trial_is_restored(tmp_path):
    with tracking.stage_run(config(tmp_path), "tune", {}, [], str(tmp_path)) as parent:
        key = {"raylm.trial_id": "t1"}
        child = tracking.start_child(parent.ref, "trial t1", {"lr": 0.1}, key)
        again = tracking.start_child(parent.ref, "trial t1", {"lr": 0.1}, key)
        child.end(tracking.FINISHED)
    assert again.run_id == child.run_id
    run = stored(child)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params == {"lr": "0.1"}


def test_disabled_tracking_writes_nothing(tmp_path):
    with tracking.stage_run(config(tmp_path, enabled=False), "train", {"a": 1}, [], str(tmp_path)) as t:
        assert not t.enabled
        t.log_metrics({"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_an_unreachable_server_warns_once_and_the_stage_goes_on(tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking, "_warned", set())
    cfg = config(tmp_path, uri=f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="raylm"):
        for _ in range(2):
            with tracking.stage_run(cfg, "train", {"a": 1}, [], str(tmp_path)) as tracker:
                tracker.log_metrics({"loss": 1.0})
                done = True
    assert done and not tracker.enabled
    warnings = [r for r in caplog.records if "experiment tracking is off" in r.message]
    assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0].message


def test_a_recipe_with_credentials_in_the_tracking_uri_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "stages": [], "tracking": {"uri": "https://u:s3cret@h/"}}))
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "tracking" in err and "MLFLOW_TRACKING_PASSWORD" in err and "s3cret" not in err
