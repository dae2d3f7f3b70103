import pytest

from raylm.core.config import build_config, load_config, parse_overrides
from raylm.core.errors import ConfigError

MINIMAL = {"name": "t", "data": {"sources": [{"path": "corpus/"}]}}


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(
        ["data.seq_len=128", "stages=[curate, train]", "data.tokenizer.path=/tmp/tok"]
    ) == {
        "data": {"seq_len": 128, "tokenizer": {"path": "/tmp/tok"}},
        "stages": ["curate", "train"],
    }


@pytest.mark.parametrize("bad", ["noequals", "=1", "a..b=1"])
def test_malformed_override_names_itself(bad):
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        parse_overrides([bad])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"data\.filterz: unknown key"):
        build_config({**MINIMAL, "data": {**MINIMAL["data"], "filterz": {}}})


def test_wrong_type_is_named_with_value():
    with pytest.raises(ConfigError, match=r"data\.seq_len: .*integer.*'long'"):
        build_config({**MINIMAL, "data": {**MINIMAL["data"], "seq_len": "long"}})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"min_words .* larger than max_words"):
        build_config({**MINIMAL, "data": {**MINIMAL["data"], "filters": {"min_words": 10, "max_words": 5}}})
    with pytest.raises(ConfigError, match="bands and rows"):
        build_config({**MINIMAL, "data": {**MINIMAL["data"], "near_dedup": {"bands": 8}}})
    with pytest.raises(ConfigError, match=r"stage 'train' .* no 'train' section"):
        build_config({**MINIMAL, "stages": ["curate", "train"]})


def test_stage_paths_are_linked():
    cfg = build_config(
        {
            "name": "demo",
            "run_dir": "s3://bucket/runs/demo",
            "stages": ["curate"],
            **{"data": MINIMAL["data"]},
        }
    )
    assert cfg.data.output == "s3://bucket/runs/demo/curated"


def test_local_paths_become_absolute_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"name": "demo", "data": {"sources": [{"path": "corpus"}, {"path": "s3://b/c"}]}})
    assert cfg.data.output == str(tmp_path / "runs/demo/curated")
    assert [s.path for s in cfg.data.sources] == [str(tmp_path / "corpus"), "s3://b/c"]


def test_quickstart_recipe_loads_with_overrides():
    cfg = load_config("quickstart", ["data.seq_len=64"])
    assert cfg.data.seq_len == 64 and cfg.stages[0] == "curate"


def test_missing_recipe():
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        load_config("nope")
