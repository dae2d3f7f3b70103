"""The console of `raylm run`: raylm's lines only, the detail in the log files it names (core/console.py).

The slow test runs `raylm run` (curate + train, the quickstart's stages on a small corpus) as a user
does, its output to a pipe (not a terminal), with a Ray of its own in the subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raylm.core import console
from tests.synthetic import document

MAX_LINES = 200


def _record(name: str, message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_console_keeps_raylm_lines_errors_and_sparse_progress():
    now = [100.0]
    keep = console.ConsoleFilter(every_s=20, clock=lambda: now[0]).filter
    assert keep(_record("raylm", "== stage curate (1/2) =="))
    assert not keep(_record("ray.data._internal.execution.streaming_executor", "Starting execution"))
    assert not keep(_record("ray", "Started a local Ray instance.", logging.WARNING))
    assert keep(_record("ray.train", "worker group failed", logging.ERROR))
    assert not keep(_record(console.RAY_DATA_PROGRESS, "Total Progress: 0/?"))
    assert keep(_record(console.RAY_DATA_PROGRESS, "Total Progress: 6491/8430"))
    now[0] += 5
    assert not keep(_record(console.RAY_DATA_PROGRESS, "Total Progress: 7000/8430")), "too soon"
    assert not keep(_record(console.RAY_DATA_PROGRESS, "Tasks: 46; Actors: 0"))
    now[0] += 20
    progress = _record(console.RAY_DATA_PROGRESS, "Total Progress: 8000/8430")
    assert keep(progress)
    console.banner("curate", 1, 2)
    assert (
        console.ConsoleFormatter()
        .format(progress)
        .endswith("raylm INFO curate: 8,000 of 8,430 rows through the current dataset")
    )


def test_pipeline_summary_names_each_stage_result():
    manifests = {
        "curate": {"counts": {"documents_read": 80, "after_near_dedup": 70, "packed_tokens": 9000}},
        "train": {"final": {"step": 6, "loss": 5.5, "eval_loss": 5.25, "eval_perplexity": 190.6}},
        "tune": {"summary": {"best_trial": "t1", "best_eval_loss": 4.0, "completed": 2, "trials": 3}},
    }
    text = console.pipeline_summary(
        {"curate": "/r/curated", "train": "/r/train", "tune": "/r/tune"},
        manifests,
        "http://h:1/v1",
        "/r/logs",
    )
    assert "curate: 80 documents in, 70 kept; 9,000 tokens" in text
    assert "train: 6 steps, final loss 5.5000, eval loss 5.2500, eval perplexity 190.60" in text
    assert "tune: best trial t1 (eval loss 4.0000), 2 of 3 trials completed" in text
    assert "serve: http://h:1/v1" in text and "logs: /r/logs" in text


def _recipe(tmp_path: Path) -> Path:
    """The quickstart's curate + train stages on 80 generated documents, trained for a few steps."""
    rng = random.Random(7)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [{"id": f"d{i:03d}", "text": document(rng)} for i in range(80)]
    (corpus / "part-0.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    recipe = yaml.safe_load((Path(__file__).parents[2] / "recipes" / "quickstart.yaml").read_text())
    recipe["stages"] = ["curate", "train"]
    del recipe["tune"], recipe["serve"]
    recipe["data"] = {
        "sources": [{"path": str(corpus)}],
        "seq_len": 32,
        "tokenizer": {"vocab_size": 400},
        "near_dedup": {"enabled": False},  # MinHash costs a minute and adds nothing to the console
    }
    recipe["train"].update(max_steps=6, eval_every=3, log_every=2, checkpoint={"every_steps": 6})
    recipe["train"]["schedule"]["warmup_steps"] = 1
    recipe["ray"] = {"num_cpus": 4, "include_dashboard": False}
    path = tmp_path / "console.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_run_prints_a_short_console_and_keeps_the_detail_in_the_logs(tmp_path):
    """`raylm run` of curate + train into a pipe: under MAX_LINES lines, with the stage banners, the step
    lines and the pipeline summary; the raylm.log it names holds Ray Data's lines, absent from the console."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_DATA_", "RAY_ADDRESS"))}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("raylm")), "run", str(_recipe(tmp_path)), f"run_dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    lines = out.splitlines()
    assert len(lines) < MAX_LINES, out
    for banner in ("== stage curate (1/2) ==", "== stage train (2/2) ==", "pipeline summary"):
        assert banner in out, out
    assert re.search(r"step 6/6 loss \d", out), out
    assert re.search(r"train: 6 steps, final loss \d+\.\d+, eval loss \d", out), out
    named = re.search(r"logs: (\S+raylm\.log) \(every library\); Ray's: (\S+)", out)
    assert named, out
    raylm_log, ray_logs = Path(named.group(1)), Path(named.group(2))
    assert raylm_log == run_dir / "logs" / "raylm.log"
    detail = raylm_log.read_text()
    assert "Execution plan of Dataset" in detail and "Execution plan of Dataset" not in out
    assert "Running Dataset" not in out, "Ray Data progress bars of a worker reached the console"
    assert (ray_logs / "ray-data" / "ray-data.log").is_file()
