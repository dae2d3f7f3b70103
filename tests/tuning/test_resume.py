"""A sweep survives a crash of its driver: `raylm tune RECIPE --resume` (Tuner.restore) ends with exactly
the requested trials, each point once, and no trial that had finished is trained again. Also the
multi-worker trial (a TorchTrainer inside the trial, Ray Train V2's pattern under Tune) and TPE."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from raylm.core.artifacts import TuneDir
from raylm.training.plots import read_history
from tests.tuning.conftest import sweep_recipe, tiny_sweep

pytestmark = pytest.mark.slow
DONE_LINE = re.compile(r"trial (\d+)/(\d+) (\S+) (completed|stopped early|error)")


def raylm_tune(recipe: str, log: str, *flags: str) -> subprocess.Popen:
    """`raylm tune` as its own driver process, joining the session's Ray (as `ray job submit` would)."""
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "raylm.core.cli", "tune", recipe, *flags]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finished(log: str) -> list[tuple[str, str]]:
    with open(log) as f:
        return [(m.group(3), m.group(4)) for m in DONE_LINE.finditer(f.read())]


def tail(log: str) -> str:
    with open(log) as f:
        return f.read()[-3000:]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_killed_sweep_resumes_to_exactly_the_requested_trials(
    ray_cluster, tiny_model_dir, tune_data, tmp_path
):
    raw = sweep_recipe(
        tiny_model_dir,
        tune_data,
        tmp_path / "run",
        scheduler={"type": "none"},
        search={"algorithm": "grid", "max_concurrent": 1},
    )
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    first_log, second_log = str(tmp_path / "first.log"), str(tmp_path / "second.log")

    driver = raylm_tune(str(recipe), first_log)
    try:
        wait_for(lambda: len(finished(first_log)) >= 2 or driver.poll() is not None, 240, "two trials")
        assert driver.poll() is None, tail(first_log)
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies; its trial actors die with it
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = {trial for trial, status in finished(first_log) if status == "completed"}
    assert 2 <= len(before) < 6

    # Without --resume the unfinished sweep is refused (before Ray starts), not silently replaced.
    refused = subprocess.run(
        [sys.executable, "-m", "raylm.core.cli", "tune", str(recipe)], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = raylm_tune(str(recipe), second_log, "--resume")
    assert resumed.wait(300) == 0, tail(second_log)
    out = TuneDir(str(tmp_path / "run" / "tune"))
    # A trial that ended within Tune's last snapshot period (TUNE_GLOBAL_CHECKPOINT_S) before the kill is
    # restored as unfinished and continues from its final checkpoint: it reports again but trains no step.
    for trial in before & {trial for trial, _ in finished(second_log)}:
        rows = read_history(out.trial(trial).metrics_jsonl)
        assert [r["step"] for r in rows] == list(range(1, 13))
        assert all(r["attempt"] == 0 for r in rows), f"{trial} finished before the crash but trained again"

    with open(out.trials_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert len({(r["lr"], r["target_modules"]) for r in rows}) == 6
    statuses = {r["trial_id"]: (r["status"], r["stop_reason"]) for r in rows}
    assert all(status == "completed" for status, _ in statuses.values()), (statuses, tail(second_log))
    # Tune's trial folders (a trial that was pending in the last snapshot may leave an empty second one).
    trial_ids = {
        "_".join(d.split("_")[2:4]) for d in os.listdir(out.experiment) if d.startswith("run_trial_")
    }
    assert trial_ids == {r["trial_id"] for r in rows}


def test_multi_worker_trials_run_a_torch_trainer_under_tune(ray_cluster, tiny_model_dir, tune_data, tmp_path):
    from raylm.tuning.run import preflight, run

    cfg = tiny_sweep(
        tiny_model_dir,
        tune_data,
        tmp_path / "run",
        trial={"num_workers": 2, "micro_batch_size": 2, "max_steps": 8},
        space={"lr": {"choice": [3e-3]}},  # one trial: the point is the TorchTrainer path
        search={"algorithm": "grid", "max_concurrent": 1},
        scheduler={"type": "none"},
    )
    preflight(cfg)
    manifest = run(cfg)
    assert manifest["summary"]["completed"] == 1
    out = TuneDir(cfg.tune.output)
    best = manifest["summary"]["best_trial"]
    out.best_adapter.validate_adapter()
    assert os.listdir(out.trial(best).checkpoints)  # Ray Train kept the trial's checkpoints there


def test_tpe_proposes_points_from_the_space(ray_cluster, tiny_model_dir, tune_data, tmp_path):
    from raylm.tuning.run import run

    cfg = tiny_sweep(
        tiny_model_dir,
        tune_data,
        tmp_path / "run",
        space={
            "lr": {"log_uniform": [1e-4, 3e-2]},
            "rank": {"choice": [2, 4, 8]},
            "dropout": {"uniform": [0, 0.1]},
            "alpha": {"tied": 2},
        },
        search={"algorithm": "tpe", "num_samples": 4, "max_concurrent": 2, "seed": 3},
    )
    manifest = run(cfg)
    with open(TuneDir(cfg.tune.output).trials_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and manifest["summary"]["trials"] == 4
    for r in rows:
        assert (
            1e-4 <= float(r["lr"]) <= 3e-2 and int(r["rank"]) in (2, 4, 8) and 0 <= float(r["dropout"]) <= 0.1
        )
        assert int(r["alpha"]) == 2 * int(r["rank"])  # alpha tied to the sampled rank
