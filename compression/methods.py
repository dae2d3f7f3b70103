"""The compression methods: each takes a loaded model and calibration batches and writes a model folder.

gptq_w4a16 / w8a8 go through compression/gptq.py's GPTQ (w8a8 after SmoothQuant) and are written in
compressed-tensors' format; sparse_2of4 / sparse_unstructured prune with SparseGPT (or by magnitude)
and are written dense. Every one runs layer by layer (compression/layerwise.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raylm.compression import gptq as G
from raylm.compression import layerwise, save
from raylm.compression.config import CompressConfig
from raylm.compression.smoothquant import smooth_layer

TWO_OF_FOUR = (2, 4)


def _layer_prefixes(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def quantize(model: nn.Module, batches: list[torch.Tensor], c: CompressConfig, method: str) -> dict:
    """GPTQ every Linear of the decoder layers; w8a8 smooths each layer first. Returns the scales by
    module name, the grid and what was done."""
    w8a8 = method == "w8a8"
    grid = G.Grid(8, None) if w8a8 else G.Grid(4, c.gptq.group_size)
    prefixes, scales, smoothed = _layer_prefixes(model), {}, 0

    def compress(_index: int, layer: nn.Module, inputs: list) -> None:
        nonlocal smoothed
        if w8a8 and c.smoothquant.alpha > 0:
            smoothed += smooth_layer(layer, inputs, c.smoothquant.alpha)
        hessians = layerwise.layer_hessians(layer, inputs)
        for name, lin in layerwise.linears(layer).items():
            q, scale = G.gptq(lin.weight, hessians[name], grid, c.gptq.dampening)
            lin.weight.data = q
            scales[f"{prefixes[id(layer)]}.{name}"] = scale

    layerwise.each_layer(model, batches, compress)
    return {"scales": scales, "grid": grid, "smoothed_mappings": smoothed}


def prune(model: nn.Module, batches: list[torch.Tensor], c: CompressConfig, method: str) -> dict:
    """Prune every Linear of the decoder layers to 2:4 or to prune.sparsity."""
    n_of_m = TWO_OF_FOUR if method == "sparse_2of4" else None
    sparsity = 0.5 if n_of_m else c.prune.sparsity

    def compress(_index: int, layer: nn.Module, inputs: list) -> None:
        mods = layerwise.linears(layer)
        if c.prune.algorithm == "magnitude":
            for lin in mods.values():
                lin.weight.data = G.magnitude(lin.weight, sparsity, n_of_m)
            return
        hessians = layerwise.layer_hessians(layer, inputs)
        for name, lin in mods.items():
            lin.weight.data = G.sparsegpt(lin.weight, hessians[name], sparsity, n_of_m, c.gptq.dampening)

    layerwise.each_layer(model, batches, compress)
    return {"sparsity": sparsity, "pattern": "2:4" if n_of_m else "unstructured"}


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears a pruning method prunes (those of the decoder layers), by module name."""
    prefixes = _layer_prefixes(model)
    return {
        f"{prefixes[id(layer)]}.{name}": lin
        for layer in layerwise.decoder_layers(model)
        for name, lin in layerwise.linears(layer).items()
    }


def sparsity_of(model: nn.Module) -> float:
    """The fraction of zero weights over the pruned Linears."""
    lins = pruned_linears(model).values()
    return sum(int((lin.weight == 0).sum()) for lin in lins) / sum(lin.weight.numel() for lin in lins)


def apply(
    model: nn.Module, tokenizer, batches: list[torch.Tensor], c: CompressConfig, method: str, out: str
) -> dict[str, Any]:
    """Compress the model by `method` and write it to `out`; returns what the manifest records."""
    if method in ("gptq_w4a16", "w8a8"):
        done = quantize(model, batches, c, method)
        grid: G.Grid = done["grid"]
        config = save.quantization_config(grid.num_bits, grid.group_size, activations=method == "w8a8")
        fmt = save.INT if method == "w8a8" else save.PACKED
        save.save_quantized(model, tokenizer, out, done["scales"], config, fmt)
        return {
            "format": f"compressed-tensors/{fmt}",
            "weight_bits": grid.num_bits,
            "group_size": grid.group_size,
            "activations": "int8 dynamic per token" if method == "w8a8" else "16/32-bit",
            "smoothed_mappings": done["smoothed_mappings"],
        }
    done = prune(model, batches, c, method)
    save.save_dense(model, tokenizer, out)
    return {"format": "hf-safetensors (dense, zeros in place)", "algorithm": c.prune.algorithm, **done}
