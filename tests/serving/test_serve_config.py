"""serve: config checks fail at load time (exit 2, before Ray), and the generated Serve config is valid."""

from __future__ import annotations

import pytest
import yaml

from raylm.core.cli import main
from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.serving.config import ServeConfig
from raylm.serving.run import api_key_hashes, serve_config


def platform(serve: dict) -> dict:
    return {"name": "t", "stages": ["serve"], "serve": serve}


def test_serve_model_defaults_to_train_export():
    cfg = build_config({"name": "demo", "stages": ["serve"], "serve": {}})
    assert cfg.serve.model.endswith("runs/demo/train/export")


@pytest.mark.parametrize(
    ("serve", "fragment"),
    [
        ({"quantization": {"method": "int4"}}, "serve.quantization.method"),
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "either num_replicas or autoscaling"),
        ({"num_replicas": None}, "no autoscaling section"),
        ({"num_replicas": None, "autoscaling": {"min_replicas": 4, "max_replicas": 2}}, "min_replicas (4)"),
        ({"batching": {"max_batch_size": 0}}, "serve.batching.max_batch_size"),
        ({"max_ongoing_requests": 1, "max_n": 1, "batching": {"max_batch_size": 4}}, "can never fill"),
        ({"device": "cuda"}, "num_gpus is 0"),
        ({"http": {"route_prefix": "v1"}}, "route_prefix must start"),
        ({"http": {"port": 70000}}, "serve.http.port"),
        ({"model_id": "a", "adapters": {"paths": {"a": "/x"}}}, "same as model_id"),
        ({"batching": {"max_batch": 4}}, "unknown key"),
    ],
)
def test_bad_serve_config_names_the_problem(serve, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(platform(serve))
    assert fragment in str(err.value)
    assert err.value.exit_code == 2


def test_cli_exits_2_on_bad_serve_override(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(platform({"model": str(tmp_path)})))
    assert main(["check", str(recipe), "serve.quantization.method=fp4"]) == 2
    assert "serve.quantization.method" in capsys.readouterr().err
    assert main(["check", str(recipe), "serve.batching.max_batch_size=16"]) == 0


def test_generated_serve_config_is_a_valid_serve_deploy_file():
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeConfig(
        model="/m",
        batching={"max_batch_size": 12},
        num_replicas=None,
        autoscaling={"min_replicas": 1, "max_replicas": 3},
    )
    text = yaml.safe_dump(serve_config(cfg, "demo", ["ab" * 32]))
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = schema.applications[0]
    assert app.import_path == "raylm.serving.app:build_from_args"
    dep = app.deployments[0]
    assert dep.user_config == {
        "max_batch_size": 12,
        "batch_wait_timeout_s": cfg.batching.batch_wait_timeout_s,
    }
    assert dep.autoscaling_config["max_replicas"] == 3 and dep.max_queued_requests == cfg.max_queued_requests
    assert app.args["model_id"] == "demo" and "batching" not in app.args["serve"]


def test_api_keys_become_digests(monkeypatch):
    assert api_key_hashes(None) == []
    monkeypatch.delenv("RAYLM_TEST_KEYS", raising=False)
    with pytest.raises(ConfigError, match="RAYLM_TEST_KEYS"):
        api_key_hashes("RAYLM_TEST_KEYS")
    monkeypatch.setenv("RAYLM_TEST_KEYS", "k1, k2")
    digests = api_key_hashes("RAYLM_TEST_KEYS")
    assert len(digests) == 2 and all(len(d) == 64 and "k1" not in d for d in digests)
