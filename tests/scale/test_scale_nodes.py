"""The same output on many nodes: curation and a 2-worker ZeRO-3 training run on a 3-node
ray.cluster_utils.Cluster give what they give on one node, and write nothing outside the run's storage.

tests/scale/nodes_scenario.py runs the 3-node side in a process of its own (its own Ray, temp dirs, HOMEs
and ports); meanwhile this process runs the one-node side on the session's Ray, over the same corpus
folder (documents name their source file, so the corpus path must be the same for both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raylm.core.artifacts import TrainDir
from tests.scale.nodes_scenario import CANARY
from tests.scale.scale_common import (
    curate_config,
    curated_differences,
    outside_storage,
    train_config,
    write_corpus,
)
from tests.training.train_helpers import history

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).resolve().with_name("nodes_scenario.py")
STEPS = 8


def one_node(corpus: str, run_dir: Path) -> dict:
    from raylm.pipelines.run import run as curate
    from raylm.training.run import run as train

    cfg = curate_config(corpus, run_dir)
    curate(cfg)
    tcfg = train_config(cfg.data.output, run_dir, STEPS)
    train(tcfg)
    return {"curated": cfg.data.output, "history": history(tcfg)}


@pytest.fixture(scope="module")
def runs(ray_cluster):
    root = Path(tempfile.mkdtemp(prefix="rlscale-", dir="/tmp"))  # short: Ray's socket paths live under it
    corpus = write_corpus(root / "corpus")
    out, sandbox = root / "nodes.json", root / "m"
    with open(root / "nodes.log", "w") as log:
        cmd = [sys.executable, str(SCENARIO), str(out), corpus, str(sandbox), "--max-steps", str(STEPS)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            single = one_node(corpus, root / "one")  # while the cluster side runs
            rc = proc.wait(900)  # generous: a loaded 2-core machine
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, (root / "nodes.log").read_text()[-4000:]
    nodes = json.loads(out.read_text())
    yield {"one": single, "nodes": nodes, "sandbox": str(sandbox), "storage": str(sandbox / "storage")}
    shutil.rmtree(root, ignore_errors=True)


def test_curation_on_three_nodes_equals_one_node(runs):
    curate = runs["nodes"]["curate"]
    assert curate["error"] is None, curate["error"]
    # The work ran on both worker nodes (the head has no CPUs).
    assert curate["task_nodes"].get("w1", 0) > 0 and curate["task_nodes"].get("w2", 0) > 0, curate
    one, many = runs["one"]["curated"], os.path.join(runs["storage"], "curated")
    assert curated_differences(one, many) == []
    # ... and the comparison had something to compare: shards, near duplicates found, rows set aside.
    manifest = json.loads(Path(many, "manifest.json").read_text())
    assert manifest["counts"]["sequences"]["train"] > 100 and os.listdir(os.path.join(many, "shards"))
    assert manifest["dedup"]["near_duplicates"] > 0 and manifest["dedup"]["exact_duplicates"] > 0
    assert os.listdir(os.path.join(many, "rejects")), manifest["drops"]


def test_zero3_workers_on_two_nodes_match_one_node(runs):
    train = runs["nodes"]["train"]
    assert train["error"] is None, train["error"]
    assert train["worker_nodes"] == ["w1", "w2"], train  # one worker on each worker node
    hist, ref = train["history"], runs["one"]["history"]
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1))
    assert all(r["attempt"] == hist[0]["attempt"] for r in hist)  # no restart hid a failure
    # The same ranks, data and gloo reductions in the same order: bitwise the same losses.
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref]
    assert [r["eval_loss"] for r in hist if "eval_loss" in r] == [
        r["eval_loss"] for r in ref if "eval_loss" in r
    ]


def test_stages_write_nothing_outside_storage(runs):
    """Outputs went to the storage folder; the cwd, every node's HOME and TMPDIR were left as they were
    (library caches aside), and no process touched another node's folder or wrote outside the sandbox."""
    nodes, sandbox = runs["nodes"], runs["sandbox"]
    train_dir = TrainDir(os.path.join(runs["storage"], "train"))
    assert os.path.exists(train_dir.metrics_jsonl) and os.path.isdir(train_dir.export.root)
    assert outside_storage(nodes["left_behind"], sandbox) == []
    # The audit hook ran in the worker nodes' processes: it caught the scenario's planted access.
    canary = [r for r in nodes["audit"] if r["path"].endswith(CANARY)]
    assert [(r["kind"], r["node"]) for r in canary] == [("other_node", "w1")], nodes["audit"]
    audit = [r for r in nodes["audit"] if r not in canary]
    found = [r for r in audit if r["kind"] != "write_home" or outside_storage([r["path"]], sandbox)]
    assert found == []
