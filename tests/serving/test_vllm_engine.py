"""The vLLM engine's config: what it cannot run fails before Ray starts (exit 2, naming the key), and the
serve section maps onto vLLM's engine arguments and Serve LLM's placement as documented. The engine
serving requests is tests/serving/test_server.py (every OpenAI test runs on both engines)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from raylm.core.cli import main
from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.serving import vllm_checks
from raylm.serving.config import ServeConfig
from raylm.serving.engine import DEFAULT_CHAT_TEMPLATE
from raylm.serving.run import serve_config

CPU = {"engine": "vllm", "dtype": "float32"}


@pytest.mark.parametrize(
    ("serve", "fragment"),
    [
        ({"engine": "vllm", "quantization": {"method": "nf4"}}, "the raylm engine's"),
        ({"quantization": {"method": "awq"}}, "set engine: vllm"),
        ({"engine": "vllm", "quantization": {"method": "fp8"}}, "fp8 runs on GPUs only"),
        ({"engine": "vllm", "vllm": {"engine_kwargs": {"max_model_len": 64}}}, "use serve.max_context"),
        ({"engine": "vllm", "vllm": {"engine_kwargs": {"hostile": [1]}}}, "serve.vllm.engine_kwargs"),
        ({"engine": "vllm", "vllm": {"tensor_parallel_size": 2}, "num_gpus": 1}, "num_gpus must be 2"),
        ({"engine": "vllm", "num_gpus": 2}, "set vllm.tensor_parallel_size"),
        ({"engine": "sglang"}, "serve.engine"),
    ],
)
def test_engine_config_errors_name_the_key(serve, fragment):
    with pytest.raises(ConfigError) as err:
        build_config({"name": "t", "stages": ["serve"], "serve": serve})
    assert fragment in str(err.value) and err.value.exit_code == 2


def test_a_head_size_the_cpu_kernels_lack_fails_before_ray(tmp_path, tiny_model_dir, capsys):
    recipe = tmp_path / "r.yaml"
    serve = {**CPU, "model": tiny_model_dir}  # 4 heads of 16
    recipe.write_text(
        yaml.safe_dump({"name": "t", "stages": ["serve"], "run_dir": str(tmp_path / "run"), "serve": serve})
    )
    assert main(["serve", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "serve.model" in err and "head size 16" in err and "engine: raylm" in err


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"dtype": "bfloat16"}, "serve.dtype bfloat16"),
        ({"quantization": {"method": "bitsandbytes"}}, "vllm-bnb-plugin"),
    ],
)
def test_what_the_installed_vllm_cannot_run_names_the_key(head32_model_dir, change, fragment):
    with pytest.raises(ConfigError, match=fragment):
        vllm_checks.check(ServeConfig(**{**CPU, "model": head32_model_dir, **change}))


def test_an_architecture_vllm_lacks_is_refused(head32_model_dir, tmp_path):
    model = shutil.copytree(head32_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ConfigError, match="NoSuchForCausalLM"):
        vllm_checks.check(ServeConfig(**CPU, model=str(model)))
    vllm_checks.check(ServeConfig(**CPU, model=head32_model_dir))  # the real one passes


def _compressed(model_dir, tmp_path, input_activations) -> str:
    """The model with a compressed-tensors quantization_config (as raylm compress writes) in its config.json."""
    model = shutil.copytree(model_dir, tmp_path / "compressed")
    config = json.loads((model / "config.json").read_text())
    group = {
        "weights": {"num_bits": 4 if input_activations is None else 8},
        "input_activations": input_activations,
    }
    quant = {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    return str(model)


def test_a_w4a16_checkpoint_is_refused_on_vllm_cpu_and_w8a8_passes(head32_model_dir, tmp_path):
    w4a16 = _compressed(head32_model_dir, tmp_path / "a", input_activations=None)
    with pytest.raises(ConfigError, match=r"W4A16.*engine: raylm"):
        vllm_checks.check(ServeConfig(**CPU, model=w4a16))
    w8a8 = _compressed(head32_model_dir, tmp_path / "b", input_activations={"num_bits": 8, "dynamic": True})
    vllm_checks.check(ServeConfig(**CPU, model=w8a8))
    with pytest.raises(ConfigError, match="already quantized"):
        vllm_checks.check(ServeConfig(**CPU, model=w8a8, quantization={"method": "bitsandbytes"}))


def test_serve_section_maps_onto_engine_arguments(head32_model_dir, head32_adapters):
    from raylm.serving.vllm_server import engine_kwargs, resources

    cfg = ServeConfig(
        **CPU,
        model=head32_model_dir,
        max_context=128,
        default_max_tokens=20,
        batching={"max_batch_size": 16},
        adapters={"paths": head32_adapters, "max_loaded": 1},
        vllm={"engine_kwargs": {"enable_prefix_caching": True}},
    )
    kwargs = engine_kwargs(cfg, head32_adapters)
    assert (kwargs["max_model_len"], kwargs["max_num_seqs"], kwargs["dtype"]) == (128, 16, "float32")
    assert "override_generation_config" not in kwargs  # vLLM reads it as a cap, not a default
    assert kwargs["generation_config"] == "vllm" and kwargs["enable_prefix_caching"] is True
    # rank 4 rounds up to vLLM's 8; a CPU replica keeps every adapter plus one empty slot (vllm_server.py)
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 8, 3)
    assert kwargs["kv_cache_memory_bytes"] == 4 * 1024**3  # CPU_KV_CACHE_GIB, not 92% of the node
    assert kwargs["chat_template"] == DEFAULT_CHAT_TEMPLATE  # the trained tokenizer has none
    assert "quantization" not in kwargs
    assert resources(cfg)["placement_group_config"] == {"bundles": [{"CPU": 1}]}
    gpu = ServeConfig(engine="vllm", model=head32_model_dir, num_gpus=2, vllm={"tensor_parallel_size": 2})
    assert resources(gpu)["placement_group_config"] == {"bundle_per_worker": {"GPU": 1.0}}
    assert "kv_cache_memory_bytes" not in engine_kwargs(gpu, {})  # GPUs: gpu_memory_utilization sizes it
    assert engine_kwargs(gpu, {})["gpu_memory_utilization"] == 0.9


def test_generated_serve_config_names_the_vllm_deployment(head32_model_dir):
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeConfig(**CPU, model=head32_model_dir, num_replicas=2)
    config = serve_config(cfg, "tiny", [])
    ServeDeploySchema.model_validate(config)
    (deployment,) = config["applications"][0]["deployments"]
    assert deployment["name"] == "VLLMServer" and deployment["num_replicas"] == 2
    assert "user_config" not in deployment  # vLLM's batch size is an engine argument, fixed at start-up
    assert config["applications"][0]["args"]["serve"]["engine"] == "vllm"


@pytest.mark.slow
def test_a_model_the_engine_cannot_load_fails_at_start_up_with_its_error(
    ray_cluster, head32_model_dir, tmp_path, loopback_port
):
    from ray import serve

    from raylm.core.errors import RaylmError
    from raylm.serving.run import start

    model = shutil.copytree(head32_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # passes every check that reads config.json only
    cfg = ServeConfig(**CPU, model=str(model), app_name="broken", http={"port": loopback_port})
    try:
        with pytest.raises(RaylmError) as err:
            start(cfg, "tiny")
    finally:
        serve.shutdown()
    message = str(err.value)
    assert "vllm engine's replicas failed to start" in message, message
    assert "model.safetensors cannot be read" in message, message  # the cause, not vLLM's "see above"
    assert "Traceback" not in message


def test_niceness_reaches_both_engines_replicas(head32_model_dir):
    from raylm.serving.app import deployment_options, gateway_options
    from raylm.serving.vllm_server import llm_config

    raylm = ServeConfig(model=head32_model_dir, niceness=0)
    assert deployment_options(raylm)["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"RAY_worker_niceness": "0"}
    }
    assert gateway_options(raylm)["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "RAY_worker_niceness": "0"
    }
    vllm = ServeConfig(
        **CPU, model=head32_model_dir, niceness=0, vllm={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0"}}
    )
    env = llm_config(vllm, "tiny", {}).runtime_env["env_vars"]
    assert env == {"RAY_worker_niceness": "0", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert "runtime_env" not in deployment_options(ServeConfig(model=head32_model_dir))["ray_actor_options"]
