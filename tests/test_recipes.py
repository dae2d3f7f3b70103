"""Every shipped recipe and cluster config loads and validates (DESIGN principle 3)."""

from pathlib import Path

import pytest
import yaml

from raylm.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CLUSTER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    cfg = load_config(str(recipe))
    assert cfg.stages, f"{recipe.name} runs no stage"


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_is_a_ray_cluster_yaml(path):
    cfg = yaml.safe_load(path.read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= cfg.keys()
    assert cfg["head_node_type"] in cfg["available_node_types"]
