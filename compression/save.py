"""Write a compressed model as a Hugging Face folder that transformers and vLLM load.

Quantized models are written in compressed-tensors' format (vLLM's own; `quantization_config` in
config.json with quant_method compressed-tensors): W4A16 as `pack-quantized` (eight int4 in an int32,
a scale per group), W8A8 as `int-quantized` (int8 weights, a scale per output channel; activations are
quantized per token at run time, so nothing about them is stored). The scales are the ones GPTQ chose;
the compressor rounds the already-quantized weights with them, so it stores GPTQ's integers exactly.
Pruned models are written dense (compressed-tensors 0.17 no longer writes sparsity formats, and vLLM
serves 2:4 only on CUDA), so their zeros are in the weights and their sparsity in raylm's manifest.
"""

from __future__ import annotations

import torch
from torch import nn

PACKED, INT = "pack-quantized", "int-quantized"
IGNORED = [
    "lm_head"
]  # the output projection stays in full precision, as in vLLM's and llm-compressor's recipes


def quantization_config(num_bits: int, group_size: int | None, activations: bool):
    """The compressed-tensors config: symmetric int weights per group (or per channel), and with
    `activations` dynamic symmetric int8 per-token activations (W8A8)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStrategy,
    )

    weights = QuantizationArgs(
        num_bits=num_bits,
        symmetric=True,
        strategy=QuantizationStrategy.GROUP if group_size else QuantizationStrategy.CHANNEL,
        group_size=group_size,
    )
    acts = (
        QuantizationArgs(num_bits=8, symmetric=True, strategy=QuantizationStrategy.TOKEN, dynamic=True)
        if activations
        else None
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORED)


@torch.no_grad()
def save_quantized(
    model: nn.Module, tokenizer, out: str, scales: dict[str, torch.Tensor], config, fmt: str
) -> None:
    """Attach the scheme, set each Linear's scales (its weight already holds the quantized values),
    compress and save. `scales` maps module names (model.named_modules) to [out, groups] scales."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    apply_quantization_config(model, config)
    for name, module in model.named_modules():
        if not hasattr(module, "quantization_scheme"):
            continue
        if name not in scales:
            raise RuntimeError(f"no calibrated scales for the quantized layer {name}")
        scale = scales[name].to(module.weight_scale.dtype)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape)
        module.weight_zero_point.data = torch.zeros_like(module.weight_zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out, safe_serialization=True)
    compressor.update_config(out)
    tokenizer.save_pretrained(out)


def save_dense(model: nn.Module, tokenizer, out: str) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
