"""Compression benchmark: one trained model, one held-out set, every way raylm makes it smaller.

Rows: fp32 (the reference), bitsandbytes int8 and nf4 (the raylm engine's load-time quantization),
GPTQ W4A16 and SmoothQuant+GPTQ W8A8 (raylm compress, compressed-tensors folders), SparseGPT 2:4, and the
baselines the calibrated methods must beat on the same grid: round-to-nearest W4A16 / W8A8 (GPTQ with an
identity Hessian is exactly rounding: no error is fed back) and magnitude 2:4; and the distilled student
at half the layers (raylm compress's distill: evenly spaced teacher layers, trained by raylm's training
loop against the teacher's logits) beside the same student trained as long on the data alone
(alpha 0), with each one's held-out KL to the teacher. For each: parameters,
bytes on disk (bitsandbytes quantizes at load: its weights' bytes in memory instead), held-out
perplexity and its ratio to fp32, and the time it took; then, served (benchmarks/compress_serving.py, unless
--skip-serving): peak memory of the serving processes and output tokens/s at concurrency 1 and 32 on the
engine that serves each, all variants served at once through raylm serve's deployment code.

    .venv/bin/python benchmarks/compress.py --model runs/quickstart/train/export \
        --data runs/quickstart/curated --out .bench/compress.json [--only distill]

Compressed models are scored as written and loaded back by transformers (W8A8 with its per-token int8
activations), the same code path as `raylm compress`'s table. No Ray: this measures the methods (the
students train in this process, world size 1, through training/loop.py's train_in_process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from unittest import mock

import torch

from raylm.compression import calibration, distill, layerwise, worker
from raylm.compression.config import CompressConfig, DistillConfig
from raylm.compression.report import comparison, table
from raylm.core.artifacts import TrainDir
from raylm.training.loop import train_in_process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compress_serving


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


def distill_rows(c: CompressConfig, a: argparse.Namespace, tmp: str) -> list[dict]:
    """The student at half the teacher's layers, distilled (alpha, T from the flags) and trained on the
    data alone (alpha 0), the same steps, seed and rows; the teacher replica's size beside each."""
    rows = []
    for name, alpha in (("distill", a.distill_alpha), ("student_ce_only", 0.0)):
        d = DistillConfig(
            max_steps=a.distill_steps,
            num_workers=1,
            micro_batch_size=4,
            global_batch_size=16,
            schedule={"lr": 1e-3, "warmup_steps": 20},
            checkpoint={"every_steps": a.distill_steps},
            alpha=alpha,
            temperature=a.distill_temperature,
            log_every=50,
        )
        cfg = c.model_copy(update={"distill": d})
        work = os.path.join(tmp, name)
        started = time.perf_counter()
        start = distill.build_student(cfg, os.path.join(work, "init"), a.seed)
        _, config = distill.student_run(cfg, a.seed, start, work)
        history = train_in_process(config, lambda metrics, checkpoint: None)
        done = worker.score_student(cfg, TrainDir(work).export.root, time.perf_counter() - started)
        rows.append(
            {
                **done["row"],
                "method": name,
                "steps": a.distill_steps,
                "alpha": alpha,
                "temperature": a.distill_temperature,
                "step_time_s_median": sorted(r["step_time_s"] for r in history)[len(history) // 2],
                "teacher_replica_bytes": worker.folder_bytes(c.model) if alpha > 0 else 0,
            }
        )
        print(
            f"{name}: ppl {done['row']['perplexity']:.3f} KL {done['row']['kl_to_teacher']:.4f}", flush=True
        )
    return rows


def serving_columns(a: argparse.Namespace, folders: dict[str, str]) -> dict:
    requests = {int(c): int(n) for c, n in (x.split(":") for x in a.requests.split(","))}
    prompts = compress_serving.held_out_prompts(a.data, a.model, max(requests.values()))
    return compress_serving.measure(compress_serving.plan(a.model, folders), prompts, a.max_tokens, requests)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=".bench/compress.json")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--only", choices=["all", "distill"], default="all", help="distill: the student rows only")
    p.add_argument("--skip-serving", action="store_true", help="no serving columns (memory, tokens/s)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per served request")
    p.add_argument("--requests", default="1:16,32:256", help="concurrency:requests per level, served")
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
    for method in ("bnb_int8", "bnb_nf4") if a.only == "all" else ():
        rows.append(bnb_row(c, method))
    plan = [
        ("gptq_w4a16", "gptq_w4a16", {}),
        ("rtn_w4a16", "gptq_w4a16", {"rtn": True}),
        ("w8a8", "w8a8", {}),
        ("rtn_w8a8", "w8a8", {"rtn": True, "smoothquant": {"alpha": 0.0}}),
        ("sparsegpt_2of4", "sparse_2of4", {}),
        ("magnitude_2of4", "sparse_2of4", {"prune": {"algorithm": "magnitude"}}),
    ]
    folders = {}
    with tempfile.TemporaryDirectory(prefix="raylm-bench-compress-") as tmp:
        for name, method, change in plan if a.only == "all" else ():
            cfg = c.model_copy(update={k: type(getattr(c, k))(**v) for k, v in change.items() if k != "rtn"})
            patch = (
                mock.patch.object(layerwise, "layer_hessians", identity_hessians)
                if change.get("rtn")
                else nullcontext()
            )
            with patch:
                done = worker.compress(cfg, method, a.seed, os.path.join(tmp, name))
            rows.append({**done["row"], "method": name})
            folders[name] = os.path.join(tmp, name)
            print(f"{name}: ppl {done['row']['perplexity']:.3f}", flush=True)
        rows += distill_rows(c, a, tmp)
        folders["distill"] = TrainDir(os.path.join(tmp, "distill")).export.root
        served = {} if a.skip_serving else serving_columns(a, folders)
    rows = comparison(ref, rows)
    print(table(rows))
    if served:
        print(compress_serving.table(served))
    result = {
        "benchmark": "compress",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": a.model,
        "data": a.data,
        "calibration_samples": a.num_samples,
        "eval_rows": a.eval_rows,
        "group_size": a.group_size,
        "distill": {
            "steps": a.distill_steps,
            "alpha": a.distill_alpha,
            "temperature": a.distill_temperature,
            "student": "half the teacher's layers, from its even layers",
            "batch": "16 rows per step (4 x 4 accumulated), lr 1e-3, warmup 20, cosine",
        },
        "rows": rows,
        "served": served,
        "serving": {
            "max_tokens": a.max_tokens,
            "requests": a.requests,
            "how": compress_serving.__doc__.split("\n\n", 1)[1].strip() if served else None,
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
