"""Search spaces: presets, what a sampled point does to a trial's config, and the spaces that fail at
config load (exit 2, naming the key)."""

from __future__ import annotations

import pytest
import yaml

from raylm.core.cli import main
from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.tuning.config import TuneConfig
from raylm.tuning.spaces import PRESETS, apply_params, grid_size, linear_module_groups, to_param_space

TRIAL = {"eval_every": 4, "max_steps": 12}


def tune_section(**tune):
    return {"name": "t", "stages": ["tune"], "tune": {"model": "/m", "trial": TRIAL, **tune}}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    trial = dict(TRIAL, lora={"enabled": preset != "full-lr"}, use_gpu=preset == "qlora")
    t = TuneConfig.model_validate({"space": {"preset": preset}, "trial": trial})
    assert t.sampled()


@pytest.mark.parametrize(
    ("space", "extra", "key"),
    [
        ({"rank": {"choice": []}}, {}, "space.rank.choice"),
        ({"rank": {"choice": [0, 4]}}, {}, "space.rank.choice.0"),
        ({"lr": {"log_uniform": [1e-2, 1e-3]}}, {}, "space.lr"),
        ({"lr": {"log_uniform": [0, 1e-3]}}, {}, "space.lr"),
        ({"lr": {"uniform": [0.1, 0.1]}}, {}, "space.lr"),
        ({"lr": {"choice": [1e-3], "uniform": [0.1, 0.2]}}, {}, "space.lr"),
        ({"dropout": {"choice": [0.0, 1.5]}}, {}, "space.dropout.choice.1"),
        ({"alpha": {"tied": 2, "choice": [8]}}, {}, "space.alpha"),
        ({"target_modules": {"choice": ["attention", ""]}}, {}, "space.target_modules"),
        ({"rank": {"choice": [4]}}, {"trial": dict(TRIAL, lora={"enabled": False})}, "space.rank"),
        ({"lr": {"log_uniform": [1e-4, 1e-2]}}, {"search": {"algorithm": "grid"}}, "space.lr"),
        (
            {"lr": {"choice": [1e-3]}},
            {"search": {"algorithm": "grid", "num_samples": 4}},
            "search.num_samples",
        ),
        ({"lr": {"choice": [1e-3]}}, {"trial": dict(TRIAL, eval_every=0)}, "trial.eval_every"),
        ({"quantize_4bit": {"choice": [True]}}, {}, "space.quantize_4bit"),
        ({"rank": {"choise": [4]}}, {}, "space.rank.choise"),
        ({}, {}, "space is empty"),
    ],
)
def test_a_space_that_cannot_be_sampled_fails_at_config_load_naming_the_key(
    space, extra, key, tmp_path, capsys
):
    raw = tune_section(space=space, **extra)
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert key in str(err.value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["check", str(recipe)]) == 2
    assert key in capsys.readouterr().err


def test_module_names_this_model_does_not_have_fail_before_ray_starts(tiny_model_dir, tmp_path, capsys):
    raw = tune_section(space={"target_modules": {"choice": ["q_proj,qkv_proj"]}})
    raw["tune"]["model"] = tiny_model_dir
    raw["run_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "space.target_modules" in err and "qkv_proj" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written or started


def test_resume_without_a_sweep_is_an_input_error(tiny_model_dir, tmp_path, capsys):
    raw = tune_section(space={"lr": {"choice": [1e-3]}})
    raw["tune"]["model"] = tiny_model_dir
    raw["run_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(recipe), "--resume"]) == 2
    assert "tune.resume" in capsys.readouterr().err


def test_layer_groups_are_found_where_the_layers_sit(tiny_model_dir):
    groups = linear_module_groups(tiny_model_dir)
    assert groups["attention"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert groups["mlp"] == ["down_proj", "gate_proj", "up_proj"]
    assert groups["all"] == sorted(groups["attention"] + groups["mlp"])  # never lm_head


def test_a_sampled_point_is_written_into_the_trial_config():
    t = TuneConfig.model_validate({"space": {"preset": "lora"}, "trial": TRIAL})
    train = t.trial.model_dump(mode="json")
    groups = {"attention": ["q_proj", "v_proj"], "mlp": ["up_proj"], "all": ["q_proj", "up_proj", "v_proj"]}
    point = {"lr": 2e-3, "rank": 8, "alpha_per_rank": 2, "dropout": 0.05, "target_modules": "mlp"}
    out = apply_params(train, point, groups)
    assert out["schedule"]["lr"] == 2e-3
    assert (out["lora"]["r"], out["lora"]["alpha"], out["lora"]["dropout"]) == (8, 16, 0.05)
    assert out["lora"]["target_modules"] == ["up_proj"]
    assert apply_params(train, {"target_modules": "q_proj, v_proj"}, groups)["lora"]["target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    assert train["schedule"]["lr"] == t.trial.schedule.lr  # the base is not modified


def test_grid_space_is_every_combination():
    t = TuneConfig.model_validate(
        {"space": {"preset": "lora-grid"}, "trial": TRIAL, "search": {"algorithm": "grid"}}
    )
    space = t.sampled()
    assert grid_size(space) == 4 * 3 * 2
    param_space = to_param_space(space, "grid")
    assert param_space["alpha_per_rank"] == 2
    assert param_space["lr"] == {"grid_search": [3e-4, 1e-3, 3e-3, 1e-2]}
