"""Every shipped recipe loads and validates, and every shipped cluster file passes `raylm cluster check`
(DESIGN principle 9)."""

import subprocess
import sys
from pathlib import Path

import pytest

from raylm.core.cli import main
from raylm.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# Launcher YAMLs (cluster/launcher/) and KubeRay manifests (cluster/kuberay/); schema/ holds JSON only.
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*/*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    cfg = load_config(str(recipe))
    assert cfg.stages, f"{recipe.name} runs no stage"


def test_there_are_cluster_files():
    names = {p.relative_to(ROOT / "cluster").as_posix() for p in CLUSTER_FILES}
    assert {"launcher/aws.yaml", "launcher/local-fake.yaml", "kuberay/raycluster.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_cluster_check(path, capsys):
    code = main(["cluster", "check", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("raylm cluster check: 1 file(s) OK"), out


@pytest.mark.slow
def test_cluster_check_console_script_on_every_file():
    """The installed `raylm` entry point, as a user runs it: exit 0 and a one-line summary."""
    raylm = Path(sys.executable).with_name("raylm")
    result = subprocess.run(
        [raylm, "cluster", "check", *CLUSTER_FILES], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        result.stdout.strip()
        == f"raylm cluster check: {len(CLUSTER_FILES)} file(s) OK (3 kuberay, 4 launcher)"
    )
