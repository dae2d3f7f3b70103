"""Run calibration through a causal LM one decoder layer at a time, as GPTQ and SparseGPT do.

The inputs of the first decoder layer are caught once (with the keyword arguments the model passes it:
attention mask, rotary position embeddings); then each layer in turn has its Linear inputs measured
(Hessians, activation maxima), is compressed, and is run again to give the next layer its inputs. So
each layer is calibrated on the outputs of the layers already compressed before it, and only one
layer's statistics are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn


class _Caught(Exception):
    """Raised by the hook on the first decoder layer: the rest of the forward pass is not needed."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (model.model.layers for Llama, Mistral, Qwen2 and kin)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} decoder layers found")


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def first_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that the first decoder layer receives for each batch."""
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, dict(kwargs)))
        raise _Caught

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            with suppress(_Caught):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outs


@contextmanager
def watching(modules: dict[str, nn.Module], observe: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call observe(name, input) on every forward of each module while the block runs."""
    handles = [
        m.register_forward_hook(lambda _m, args, _out, name=name: observe(name, args[0]))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Hessian:
    """The running 2/n · Σ x xᵀ of a Linear's inputs (GPTQ's H), accumulated in float32."""

    def __init__(self, columns: int, device: torch.device):
        self.h = torch.zeros(columns, columns, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        k = x.shape[0]
        self.h *= self.n / (self.n + k)
        self.n += k
        x = (2 / self.n) ** 0.5 * x
        self.h += x.T @ x


@torch.no_grad()
def layer_hessians(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> dict[str, torch.Tensor]:
    """H of every Linear in the layer, from one pass of the calibration inputs."""
    mods = linears(layer)
    stats = {name: Hessian(m.in_features, m.weight.device) for name, m in mods.items()}
    with watching(mods, lambda name, x: stats[name].add(x)):
        run_layer(layer, inputs)
    return {name: s.h for name, s in stats.items()}


@torch.no_grad()
def each_layer(
    model: nn.Module, batches: list[torch.Tensor], compress: Callable[[int, nn.Module, list], Any]
) -> None:
    """compress(index, layer, inputs) for each decoder layer in order, each fed the outputs of the
    layers compressed before it."""
    inputs = first_layer_inputs(model, batches)
    for index, layer in enumerate(decoder_layers(model)):
        compress(index, layer, inputs)
        inputs = run_layer(layer, inputs)
