"""What one Ray task of `raylm compress` does: load the model, compress it one way, write it, load the
written folder back and score it. No Ray here; compression/run.py sends these functions to workers.

The perplexity of a compressed model is measured on the folder as written, loaded by transformers
(compressed-tensors' integration decompresses int4 / int8 weights and, for W8A8, quantizes activations
per token as vLLM does), so the table measures the artifact a user serves, and proves it loads.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from raylm.compression import calibration, methods
from raylm.compression.config import PRUNED, CompressConfig

REFERENCE = "reference"
QUANT_PARAMS = ("_scale", "_zero_point", "_g_idx", "_global_scale")


def device_of(c: CompressConfig) -> torch.device:
    return torch.device("cuda" if c.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")


def load(path: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def folder_bytes(path: str) -> int:
    """Bytes of the weights on disk (every .safetensors file of the folder)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def parameters(model: torch.nn.Module) -> int:
    """Parameters of the model as a network: a quantized weight counts its logical size, its scales and
    zero points (compressed-tensors keeps them as parameters) are not counted."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith(QUANT_PARAMS))


def reference(c: CompressConfig) -> dict[str, Any]:
    """The row of the uncompressed model."""
    model, _ = load(c.model, device_of(c))
    ppl = calibration.perplexity(model, calibration.eval_batches(c.data_dir, c.eval))
    return {
        "method": REFERENCE,
        "parameters": parameters(model),
        "bytes": folder_bytes(c.model),
        "perplexity": ppl,
        "path": c.model,
    }


def compress(c: CompressConfig, method: str, seed: int, out: str) -> dict[str, Any]:
    """Compress by `method` into `out` (a folder to create); the comparison row plus the method's details."""
    device = device_of(c)
    started = time.perf_counter()
    model, tokenizer = load(c.model, device)
    count = parameters(model)  # compressing changes how weights are stored, not the network's shape
    batches = [b.to(device) for b in calibration.calibration_batches(c.data_dir, c.calibration, seed)]
    details = methods.apply(model, tokenizer, batches, c, method, out)
    seconds = time.perf_counter() - started
    del model
    written, _ = load(out, device)
    row = {
        "method": method,
        "parameters": count,
        "bytes": folder_bytes(out),
        "perplexity": calibration.perplexity(written, calibration.eval_batches(c.data_dir, c.eval)),
        "compress_s": round(seconds, 2),
        "calibration_samples": sum(len(b) for b in batches),
    }
    if method in PRUNED:
        row["sparsity"] = methods.sparsity_of(written)
    return {"row": row, "details": details}


def score_student(c: CompressConfig, out: str, seconds: float) -> dict[str, Any]:
    """The comparison row of a distilled student (compression/distill.py trained it into `out`): also its
    mean per-token KL to the teacher on the held-out rows."""
    from raylm.training.distill import kl_to_teacher

    device = device_of(c)
    student, _ = load(out, device)
    teacher, _ = load(c.model, device)
    held_out = calibration.eval_batches(c.data_dir, c.eval)
    row = {
        "method": "distill",
        "parameters": parameters(student),
        "bytes": folder_bytes(out),
        "perplexity": calibration.perplexity(student, held_out),
        "kl_to_teacher": kl_to_teacher(student, teacher, held_out),
        "compress_s": round(seconds, 2),
    }
    return {"row": row}
