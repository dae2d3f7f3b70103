"""The CLI fails before Ray starts, with exit code 2 and a message naming the problem."""

import subprocess
import sys

import pytest
import yaml


def raylm(*args):
    return subprocess.run(
        [sys.executable, "-m", "raylm.core.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["curate", "quickstart", "data.seq_len=abc"], "data.seq_len"),
        (["curate", "quickstart", "data.nonsense=1"], "data.nonsense: unknown key"),
        (["run", "quickstart", "stages=[curate, train, train]"], "stages"),
        (["curate", "does-not-exist.yaml"], "recipe 'does-not-exist.yaml' not found"),
        (
            ["curate", "quickstart", "data.sources=[{path: /no/such/corpus}]"],
            "'/no/such/corpus' does not exist",
        ),
    ],
)
def test_bad_input_exits_2_before_ray(args, message):
    proc = raylm(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_check_prints_resolved_config():
    proc = raylm("check", "quickstart", "data.seq_len=64")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["data"]["seq_len"] == 64 and resolved["data"]["output"].endswith(
        "runs/quickstart/curated"
    )
