"""Model FLOPs utilization: the FLOPs a step needs (training/model.py's flops_per_token) over the FLOPs
the workers could do in that time (the peak of one device times the number of workers).

The peak is `train.peak_flops` when set, H100 bf16 dense on CUDA, and on CPU the fp32 matmul rate this
worker reaches, measured once at startup: there is no spec sheet for a VM's share of a CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from raylm.training.config import TrainConfig
from raylm.training.model import flops_per_token

H100_BF16_DENSE_FLOPS = 989e12


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul rate of a 512^3 GEMM, best of 5 (used as MFU's peak on CPU)."""
    a = torch.randn(512, 512, dtype=dtype, device=device)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, time.perf_counter() - t)
    return 4 * 2 * 512**3 / best


def peak_flops(cfg: TrainConfig, device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of one device, and where the number comes from (for the startup log line)."""
    if cfg.peak_flops:
        return cfg.peak_flops, "train.peak_flops"
    if device.type == "cuda":
        return H100_BF16_DENSE_FLOPS, "H100 bf16 dense spec (989 TFLOP/s)"
    return measured_peak_flops(device, torch.float32), "measured fp32 matmul rate of this CPU worker"


@dataclass(frozen=True)
class Mfu:
    """MFU of a step from its throughput: flops_per_token * tokens/s / (peak * workers)."""

    flops_per_token: float
    peak: float
    peak_source: str
    workers: int

    def __call__(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / (self.peak * self.workers)


def mfu_meter(cfg: TrainConfig, module, seq_len: int, device: torch.device, workers: int) -> Mfu:
    """The meter for this run; `module` is the trained model (a PEFT model counts its base model)."""
    model_config = module.base_model.model.config if cfg.lora.enabled else module.config
    peak, source = peak_flops(cfg, device)
    return Mfu(flops_per_token(model_config, seq_len), peak, source, workers)
