"""raylm compress refuses what it cannot do before Ray starts: exit 2, naming the key."""

from __future__ import annotations

import os

import pytest
import yaml

from raylm.core.cli import main
from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.core.stages import BY_NAME, output_of
from tests.compression.conftest import compress_recipe


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"methods": []}, "methods: list at least one"),
        ({"methods": ["w8a8", "w8a8"]}, "lists a method twice"),
        ({"methods": ["awq"]}, "compress.methods.0"),
        ({"prune": {"sparsity": 1.0}}, "compress.prune.sparsity"),
        ({"calibration": {"num_samples": 0}}, "compress.calibration.num_samples"),
        ({"smoothquant": {"alpha": 1.5}}, "compress.smoothquant.alpha"),
        ({"resources": {"num_gpus": -1}}, "compress.resources.num_gpus"),
    ],
)
def test_bad_sections_fail_at_load(tmp_path, change, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(compress_recipe("/m", "/d", tmp_path, **change))
    assert fragment in str(err.value) and err.value.exit_code == 2


def test_default_output_and_inputs_come_from_the_stage_table(tmp_path):
    raw = compress_recipe("/m", "/d", tmp_path)
    raw["compress"] = {"methods": ["w8a8"]}
    raw["stages"] = ["compress"]
    cfg = build_config(
        {**raw, "data": {"sources": [{"path": "/corpus"}]}, "train": {"model": {"path": "/base"}}}
    )
    assert cfg.compress.output == os.path.join(str(tmp_path), "compress")
    assert cfg.compress.model == os.path.join(str(tmp_path), "train", "export")
    assert cfg.compress.data_dir == output_of(BY_NAME["curate"], cfg)


def _cli(tmp_path, recipe: dict) -> int:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["compress", str(path)])


def test_missing_model_exits_2(tmp_path, compress_data, capsys):
    assert _cli(tmp_path, compress_recipe(str(tmp_path / "nope"), compress_data, tmp_path / "run")) == 2
    assert "compress.model" in capsys.readouterr().err


def test_group_size_that_does_not_divide_the_layers_exits_2(tmp_path, trained_model, compress_data, capsys):
    recipe = compress_recipe(trained_model, compress_data, tmp_path / "run", gptq={"group_size": 48})
    assert _cli(tmp_path, recipe) == 2
    assert "compress.gptq.group_size 48" in capsys.readouterr().err


def test_calibration_longer_than_the_rows_exits_2(tmp_path, trained_model, compress_data, capsys):
    recipe = compress_recipe(trained_model, compress_data, tmp_path / "run", calibration={"seq_len": 4096})
    assert _cli(tmp_path, recipe) == 2
    assert "compress.calibration.seq_len" in capsys.readouterr().err


def test_an_output_folder_raylm_did_not_write_is_refused(tmp_path, trained_model, compress_data, capsys):
    foreign = tmp_path / "run" / "compress"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    assert _cli(tmp_path, compress_recipe(trained_model, compress_data, tmp_path / "run")) == 2
    assert "did not write" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "years of work"
