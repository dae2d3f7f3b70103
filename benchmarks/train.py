"""Training benchmarks, side by side in one run; JSON out (default .bench/train.json).

    .venv/bin/python benchmarks/train.py                # CPU: Ray TorchTrainer vs torchrun, recovery
    .venv/bin/python benchmarks/train.py --gpu          # on a CUDA machine: ~1B Llama MFU, ZeRO-0/2/3

CPU (2 workers, gloo, DeepSpeed ZeRO-3, the same loop, model, data and seed):
  * steady-state step time of Ray Train's TorchTrainer against plain torchrun (median over the steps
    after the first 3), its ratio, and the time from launch to the first finished step;
  * recovery: SIGKILL one Ray Train worker right after a checkpoint is committed, and measure the seconds
    to the first resumed step, broken down into restart (kill -> loop start on the new workers: failure
    detection, new actors, process group), data, DeepSpeed init (model build + engine), checkpoint load,
    and the first step itself.
GPU: tokens/s, MFU = flops_per_token * tokens/s / (peak FLOP/s * GPUs), flops_per_token = 6N + 12*L*H*S
(training/model.py), peak 989e12 (H100 bf16 dense), bf16, sequence 2048, and checkpoint save time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from raylm.core.artifacts import TrainDir  # noqa: E402


def make_curated(out: Path, seq_len: int, rows: int, vocab: int = 2048) -> str:
    """A curated folder (pipelines/ contract) from generated text: tokenizer + packed train/eval shards."""
    import numpy as np

    from raylm.core import lineage
    from raylm.core.artifacts import CURATED, CuratedDir
    from raylm.pipelines.tokenize import train_tokenizer
    from raylm.pipelines.write import write_token_split
    from tests.synthetic import sample_text

    rng = random.Random(0)
    texts = [sample_text(rng, 80) for _ in range(800)]
    tok = train_tokenizer(iter(texts), vocab_size=vocab)
    curated = CuratedDir(str(out))
    tok.save_pretrained(curated.tokenizer)
    ids: list[int] = []
    while len(ids) < rows * seq_len:
        ids += tok(rng.choice(texts), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    data = np.asarray(ids[: rows * seq_len], dtype=np.int32).reshape(rows, seq_len)
    Path(curated.shards).mkdir(parents=True)
    n_eval = max(8, rows // 20)
    for split, part in (("train", data[n_eval:]), ("eval", data[:n_eval])):
        write_token_split(curated.shards, split, part, vocab_size=len(tok))
    lineage.write_manifest(
        curated.root,
        CURATED,
        {},
        seq_len=seq_len,
        vocab_size=len(tok),
        counts={"train_sequences": rows - n_eval, "eval_sequences": n_eval},
    )
    return str(out)


def train_cfg(data_dir: str, out: Path, **over):
    from raylm.core.config import deep_merge
    from raylm.training.config import TrainConfig

    base = {
        "data_dir": data_dir,
        "output": str(out),
        "export": False,
        "num_workers": 2,
        "max_steps": 30,
        "micro_batch_size": 4,
        "global_batch_size": 16,
        "log_every": 10,
        "eval_every": 0,
        "eval_batches": 1,
        "model": {
            "from_scratch": {
                "hidden_size": 256,
                "intermediate_size": 688,
                "num_layers": 4,
                "num_heads": 8,
                "num_kv_heads": 4,
            }
        },
        "schedule": {"lr": 1e-3, "warmup_steps": 3},
        "checkpoint": {"every_steps": 10, "keep_last": 2, "max_failures": 2},
    }
    return TrainConfig.model_validate(deep_merge(base, over))


def read_history(out: Path) -> list[dict]:
    return [json.loads(line) for line in Path(TrainDir(str(out)).metrics_jsonl).read_text().splitlines()]


def summarize(hist: list[dict], t_launch: float) -> dict:
    """Steady state = steps after the first 3 that neither took nor followed a checkpoint. step_time_s is
    the loop's own compute; wall_per_step_s (between consecutive step ends) adds everything the runtime
    does between steps (Ray Train's report barrier, metrics), which is the overhead that matters."""
    steady = [r for r in hist[3:] if "checkpointed" not in r]
    walls = [
        b["t_wall"] - a["t_wall"]
        for a, b in itertools.pairwise(hist[3:])
        if "checkpointed" not in a and "checkpointed" not in b and b["attempt"] == a["attempt"]
    ]
    return {
        "steady_step_s_median": statistics.median(r["step_time_s"] for r in steady),
        "wall_per_step_s_median": statistics.median(walls),
        "steps_measured": len(walls),
        "time_to_first_step_s": hist[0]["first_step_wall"] - t_launch,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
        "checkpoint_s_median": statistics.median(r["checkpoint_s"] for r in hist if "checkpoint_s" in r),
        "final_loss": hist[-1]["loss"],
    }


def run_torchrun(data_dir: str, out: Path, seq_len: int, nproc: int = 2, **over) -> dict:
    from raylm.training.run import loop_config

    t = train_cfg(data_dir, out, num_workers=nproc, **over)
    config = loop_config(
        t, 0, {"seq_len": seq_len}, None, backend="torchrun", storage_dir=TrainDir(str(out)).checkpoints
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if not t.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--master-port=29611",
            "-m",
            "raylm.training.loop",
            str(out / "config.json"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return summarize(read_history(out), t0) | {"wall_s": time.time() - t0}


def run_ray(data_dir: str, out: Path, seq_len: int, kill_after: str | None = None) -> dict:
    from raylm.training.run import build_trainer, loop_config, storage_path

    t = train_cfg(data_dir, out)
    config = loop_config(t, 0, {"seq_len": seq_len}, None)
    sent: list[dict] = []
    if kill_after:
        sys.path.insert(0, str(ROOT / "tests" / "training"))
        from train_helpers import signal_after_checkpoints

        watcher, sent = signal_after_checkpoints([(f"{storage_path(t)}/run/{kill_after}", signal.SIGKILL)])
    t0 = time.time()
    build_trainer(t, config).fit()
    result = summarize(read_history(out), t0) | {"wall_s": time.time() - t0}
    if kill_after:
        watcher.join(5)
        hist = read_history(out)
        first = next(r for r in hist if r["attempt"] == 1)
        t_kill = sent[0]["t_kill"]
        result["recovery"] = {
            "kill_to_first_resumed_step_s": first["first_step_wall"] - t_kill,
            "restart_s (detect + new actors + process group)": first["t_loop_start"] - t_kill + first["pg_s"],
            "data_s": first["data_s"],
            "deepspeed_init_s": first["ds_init_s"],
            "checkpoint_load_s": first["ckpt_load_s"],
            "first_step_s": first["step_time_s"],
            "resumed_at_step": first["step"] - 1,
        }
    return result


def cpu_benchmarks(work: Path) -> dict:
    import ray

    seq_len = 128
    data = make_curated(work / "curated", seq_len, rows=640)
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}},
    )
    runs = {"torchrun": [], "ray": []}
    for i in range(2):  # interleaved, so drift in machine load hits both sides alike
        runs["torchrun"].append(run_torchrun(data, work / f"torchrun{i}", seq_len))
        runs["ray"].append(run_ray(data, work / f"ray{i}", seq_len))
    recovery = run_ray(data, work / "recovery", seq_len, kill_after="step_00000010")
    ray.shutdown()
    med = {k: statistics.median(r["steady_step_s_median"] for r in v) for k, v in runs.items()}
    ttfs = {k: statistics.median(r["time_to_first_step_s"] for r in v) for k, v in runs.items()}
    return {
        "runs": runs,
        "steady_step_s": med,
        "ray_overhead_ratio": med["ray"] / med["torchrun"],
        "time_to_first_step_s": ttfs,
        "recovery": recovery["recovery"],
        "setup": {
            "workers": 2,
            "backend": "gloo",
            "zero_stage": 3,
            "seq_len": seq_len,
            "global_batch": 16,
            "model": "Llama 4 layers, hidden 256",
            "steps": 30,
            "ray_report_every": 10,  # train.report_every: the loop reports every step, Ray Train gets every 10th
        },
    }


def gpu_benchmarks(work: Path) -> dict:
    """~1B Llama (hidden 2048, 22 layers, 16 heads, 4 kv heads, MLP 5632), bf16, seq 2048, 1 GPU per worker."""
    import torch

    if not torch.cuda.is_available():
        return {"not_measured": "no CUDA GPU on this machine"}
    seq_len = 2048
    data = make_curated(work / "curated-gpu", seq_len, rows=512, vocab=8192)
    model = {
        "from_scratch": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_layers": 22,
            "num_heads": 16,
            "num_kv_heads": 4,
        }
    }
    results = {}
    n = torch.cuda.device_count()
    for stage in (0, 2, 3):
        out = work / f"gpu-zero{stage}"
        results[f"zero{stage}"] = run_torchrun(
            data,
            out,
            seq_len,
            nproc=n,
            use_gpu=True,
            model=model,
            max_steps=20,
            micro_batch_size=4,
            global_batch_size=4 * n * 2,
            deepspeed={"zero_stage": stage, "precision": "bf16"},
            checkpoint={"every_steps": 10},
            log_every=5,
        )
        hist = read_history(out)
        results[f"zero{stage}"]["mfu_median"] = statistics.median(r["mfu"] for r in hist[3:])
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".bench" / "train.json"))
    p.add_argument("--gpu", action="store_true", help="run the ~1B-parameter GPU benchmark instead")
    args = p.parse_args()
    work = Path(os.environ.get("RAYLM_BENCH_DIR", "/tmp/raylm-bench-train"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": os.environ.get("RAYLM_MACHINE", "2-core CPU VM, no GPU"),
    }
    result |= gpu_benchmarks(work) if args.gpu else cpu_benchmarks(work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
