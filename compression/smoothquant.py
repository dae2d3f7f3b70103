"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

Per-token int8 activations lose the small channels of a token when a few channels are much larger. For a
Linear fed by a normalization layer, y = W (g ⊙ x̂): dividing the norm's gain g by a per-channel s and
multiplying W's input columns by s leaves y unchanged, and with s_j = max|X_j|^α / max|W_:,j|^(1-α) the
activations and the weights share the range. Only norm-fed Linears are smoothed (q/k/v after the input
norm, gate/up after the post-attention norm), as SmoothQuant and llm-compressor's default mappings do.
"""

from __future__ import annotations

import torch
from torch import nn

from raylm.compression.layerwise import run_layer, watching

# (norm, the Linears it feeds) inside a decoder layer, by attribute path (Llama, Mistral, Qwen2, ...).
MAPPINGS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
MIN_SCALE = 1e-5


def _find(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


@torch.no_grad()
def smooth_layer(layer: nn.Module, inputs: list, alpha: float) -> int:
    """Smooth every mapping the layer has, from one pass of its calibration inputs; returns how many."""
    found = []
    for norm_path, linear_paths in MAPPINGS:
        norm = _find(layer, norm_path)
        lins = [_find(layer, p) for p in linear_paths]
        if norm is not None and getattr(norm, "weight", None) is not None and all(lins):
            found.append((norm, lins))
    if not found:
        return 0
    absmax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m

    with watching({str(i): lins[0] for i, (_, lins) in enumerate(found)}, observe):
        run_layer(layer, inputs)
    for i, (norm, lins) in enumerate(found):
        w_max = torch.cat([lin.weight.abs() for lin in lins], dim=0).amax(dim=0).float()
        s = (absmax[str(i)].pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)
        norm.weight.div_(s.to(norm.weight.dtype))
        for lin in lins:
            lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))
    return len(found)
