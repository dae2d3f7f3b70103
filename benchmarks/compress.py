"""Compression benchmark: one trained model, one held-out set, every way raylm makes it smaller.

Rows: fp32 (the reference), bitsandbytes int8 and nf4 (the raylm engine's load-time quantization),
GPTQ W4A16 and SmoothQuant+GPTQ W8A8 (raylm compress, compressed-tensors folders), SparseGPT 2:4, and the
baselines the calibrated methods must beat on the same grid: round-to-nearest W4A16 / W8A8 (GPTQ with an
identity Hessian is exactly rounding: no error is fed back) and magnitude 2:4. For each: parameters,
bytes on disk (bitsandbytes quantizes at load: its weights' bytes in memory instead), held-out
perplexity and its ratio to fp32, and the time it took.

    .venv/bin/python benchmarks/compress.py --model runs/quickstart/train/export \
        --data runs/quickstart/curated --out .bench/compress.json

Compressed models are scored as written and loaded back by transformers (W8A8 with its per-token int8
activations), the same code path as `raylm compress`'s table. No Ray: this measures the methods.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from unittest import mock

import torch

from raylm.compression import calibration, layerwise, worker
from raylm.compression.config import CompressConfig
from raylm.compression.report import comparison, table


def identity_hessians(layer, inputs):
    """A Hessian of I for every Linear: GPTQ then rounds each weight to the nearest grid point."""
    return {n: torch.eye(m.in_features) for n, m in layerwise.linears(layer).items()}


def bnb_row(c: CompressConfig, method: str) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (
        BitsAndBytesConfig(load_in_8bit=True)
        if method == "bnb_int8"
        else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(c.model, quantization_config=q, device_map={"": "cpu"})
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "parameters": worker.parameters(AutoModelForCausalLM.from_pretrained(c.model)),
        "bytes": model.get_memory_footprint(),
        "bytes_are": "in memory (quantized at load)",
        "perplexity": calibration.perplexity(model, calibration.eval_batches(c.data_dir, c.eval)),
        "compress_s": round(seconds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=".bench/compress.json")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    c = CompressConfig(
        model=a.model,
        data_dir=a.data,
        methods=["gptq_w4a16"],
        calibration={"num_samples": a.num_samples},
        eval={"max_rows": a.eval_rows},
        gptq={"group_size": a.group_size},
    )
    ref = worker.reference(c)
    rows = []
    for method in ("bnb_int8", "bnb_nf4"):
        rows.append(bnb_row(c, method))
    plan = [
        ("gptq_w4a16", "gptq_w4a16", {}),
        ("rtn_w4a16", "gptq_w4a16", {"rtn": True}),
        ("w8a8", "w8a8", {}),
        ("rtn_w8a8", "w8a8", {"rtn": True, "smoothquant": {"alpha": 0.0}}),
        ("sparsegpt_2of4", "sparse_2of4", {}),
        ("magnitude_2of4", "sparse_2of4", {"prune": {"algorithm": "magnitude"}}),
    ]
    with tempfile.TemporaryDirectory(prefix="raylm-bench-compress-") as tmp:
        for name, method, change in plan:
            cfg = c.model_copy(update={k: type(getattr(c, k))(**v) for k, v in change.items() if k != "rtn"})
            patch = (
                mock.patch.object(layerwise, "layer_hessians", identity_hessians)
                if change.get("rtn")
                else nullcontext()
            )
            with patch:
                done = worker.compress(cfg, method, a.seed, os.path.join(tmp, name))
            rows.append({**done["row"], "method": name})
            print(f"{name}: ppl {done['row']['perplexity']:.3f}", flush=True)
    rows = comparison(ref, rows)
    print(table(rows))
    result = {
        "benchmark": "compress",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": a.model,
        "data": a.data,
        "calibration_samples": a.num_samples,
        "eval_rows": a.eval_rows,
        "group_size": a.group_size,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
