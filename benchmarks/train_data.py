"""Training data at corpus size: memory and data-loading wait of the token shard reader against the
in-memory path it replaced; JSON out (default .bench/train_data.json).

    .venv/bin/python benchmarks/train_data.py [--big 1e9] [--small 1e7] [--legacy 1e8] [--steps 40]

Synthetic token shards (random ids of a 512-token vocabulary, uint16, rows of 128, written with numpy
through pipelines/write.py's shard writer, not through curation) of `small`, `legacy` and `big` tokens.
Each scenario is one real `TorchTrainer` run of training/loop.py (2 CPU workers, gloo, DeepSpeed ZeRO-3,
the tests' tiny Llama, global batch 8) started from its own driver process, so every peak RSS is of
that scenario alone:

  * shards    this code: every worker reads the rows of its own batches from the shard files (the next
              step's read ahead); the driver passes no data.
  * in_memory the path before it (training/data.py and training/run.py at git HEAD before this change):
              the driver reads every shard into Arrow tables and hands them to Ray Data; every worker
              materializes the whole split as one int32 array (get_dataset_shard, unsplit).

Per scenario: peak RSS (ru_maxrss) of the driver and of each worker, the seconds each worker spent
opening or loading the data before the first step (`data_s`), and per steady step (after the first 3)
the loop's own data wait (`data_wait_s`: reading this rank's rows, or waiting for the read-ahead) against
the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ_LEN = 128
VOCAB = 512
ROWS_PER_SHARD = 2**19  # 64M tokens, 128 MB of uint16 per shard
EVAL_ROWS = 256


# ---- data -------------------------------------------------------------------------------------------


def make_tokenizer(work: Path) -> tuple[str, int]:
    """A byte-level BPE tokenizer of at most VOCAB tokens (the model's embedding size is its length)."""
    import random

    from raylm.pipelines.tokenize import train_tokenizer
    from tests.synthetic import sample_text

    rng = random.Random(0)
    tok = train_tokenizer(iter([sample_text(rng, 60) for _ in range(400)]), vocab_size=VOCAB)
    tok.save_pretrained(work / "tokenizer")
    return str(work / "tokenizer"), len(tok)


def make_curated(folder: Path, tokens: int, tokenizer: tuple[str, int]) -> str:
    """A curated folder of `tokens` random train tokens (one shard generated at a time) plus a small
    eval split, the tokenizer and a manifest."""
    import numpy as np

    from raylm.core import lineage
    from raylm.core.artifacts import CURATED, CuratedDir
    from raylm.pipelines.write import write_index, write_token_file

    tokenizer_dir, vocab = tokenizer
    curated = CuratedDir(str(folder))
    os.makedirs(curated.shards)
    rng = np.random.default_rng(0)
    rows, written = tokens // SEQ_LEN, []
    for i, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        part = rng.integers(0, vocab, size=(min(ROWS_PER_SHARD, rows - start), SEQ_LEN), dtype=np.uint16)
        written.append(write_token_file(f"{curated.shards}/{CuratedDir.shard_name('train', i)}", part))
    write_index(curated.shards, "train", written)
    eval_rows = rng.integers(0, vocab, size=(EVAL_ROWS, SEQ_LEN), dtype=np.uint16)
    write_index(
        curated.shards,
        "eval",
        [write_token_file(f"{curated.shards}/{CuratedDir.shard_name('eval', 0)}", eval_rows)],
    )
    shutil.copytree(tokenizer_dir, curated.tokenizer)
    counts = {"train_sequences": rows, "eval_sequences": EVAL_ROWS}
    lineage.write_manifest(curated.root, CURATED, {}, seq_len=SEQ_LEN, vocab_size=vocab, counts=counts)
    return curated.root


def train_cfg(data_dir: str, out: Path, steps: int):
    from raylm.training.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "data_dir": data_dir,
            "output": str(out),
            "export": False,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "max_steps": steps,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "log_every": 10,
            "eval_every": 0,
            "eval_batches": 1,
            "report_every": steps,  # a Ray Train report is a ~1 s barrier: only at the end
            "schedule": {"lr": 3e-3, "warmup_steps": 2},
            "model": {
                "from_scratch": {
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_layers": 2,
                    "num_heads": 4,
                    "num_kv_heads": 2,
                }
            },
            "deepspeed": {"zero_stage": 3},
            "checkpoint": {"every_steps": steps, "keep_last": 1, "max_failures": 0},
        }
    )


# ---- one scenario, in its own driver process ----------------------------------------------------------


def worker_loop(config: dict) -> None:
    """A Ray Train worker: training/loop.py's train(), then this process's peak RSS to a file."""
    from raylm.training.loop import train
    from raylm.training.runtime import RayTrain, ray_train_report

    rt = in_memory_runtime() if config["legacy"] else RayTrain()
    train(config, rt, ray_train_report(config["train"]["report_every"]))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(config["rss_dir"], f"rank{rt.rank}.json").write_text(
        json.dumps({"rank": rt.rank, "peak_rss_mb": peak_mb})
    )


def in_memory_runtime():
    """The worker side of the path before token shards: the whole split from Ray Data as one int32 array
    (training/data.py tokens_from_ray at HEAD), indexed in memory."""
    import numpy as np
    import ray.train

    from raylm.training.runtime import RayTrain

    class InMemory:
        def __init__(self, array: np.ndarray):
            self.array, self.shape, self.wait_s = array, array.shape, 0.0

        def __len__(self) -> int:
            return len(self.array)

        def __getitem__(self, key):
            t0 = time.perf_counter()
            out = self.array[key]
            self.wait_s += time.perf_counter() - t0
            return out

        def prefetch(self, rows) -> None:
            pass

        def close(self) -> None:
            pass

    def tokens_from_ray(iterator) -> np.ndarray:
        parts = [
            np.asarray(
                np.stack(list(b["input_ids"])) if b["input_ids"].dtype == object else b["input_ids"],
                dtype=np.int32,
            )
            for b in iterator.iter_batches(batch_size=4096, batch_format="numpy", prefetch_batches=1)
        ]
        return np.concatenate(parts)

    class InMemoryRuntime(RayTrain):
        def dataset(self, split: str, data_dir: str):
            try:
                it = ray.train.get_dataset_shard(split)
            except KeyError:
                return None
            return InMemory(tokens_from_ray(it)) if it is not None else None

    return InMemoryRuntime()


def in_memory_datasets(data_dir: str) -> dict:
    """The driver side of the path before token shards (training/run.py read_datasets at HEAD): every
    shard read into an Arrow list<int32> table on the driver and handed to Ray Data."""
    import numpy as np
    import pyarrow as pa
    import ray.data

    from raylm.core.artifacts import CuratedDir

    datasets = {}
    for split in ("train", "eval"):
        tables = []
        for f in CuratedDir(data_dir).shard_files(split):
            flat = pa.array(np.fromfile(f, "<u2").astype(np.int32))
            tables.append(
                pa.table(
                    {"input_ids": pa.FixedSizeListArray.from_arrays(flat, SEQ_LEN).cast(pa.list_(pa.int32()))}
                )
            )
        datasets[split] = ray.data.from_arrow(tables)
    return datasets


def trainer_for(t, config: dict, legacy: bool):
    """This code's TorchTrainer (no datasets), or the one before it (the splits through Ray Data)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.training.run import build_trainer, storage_path

    if not legacy:
        return build_trainer(t, config, loop=worker_loop)
    return TorchTrainer(
        worker_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=t.checkpoint.run_name, storage_path=storage_path(t)),
        datasets=in_memory_datasets(t.data_dir),
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


def drive(data_dir: str, out: Path, steps: int, legacy: bool) -> dict:
    """One scenario in this (driver) process: a local Ray, the run, the figures."""
    import ray

    from raylm.core.artifacts import TrainDir
    from raylm.training.run import loop_config

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}},
    )
    t = train_cfg(data_dir, out, steps)
    rss_dir = out / "rss"
    rss_dir.mkdir(parents=True)
    config = loop_config(t, 0, {"seq_len": SEQ_LEN}, None) | {"legacy": legacy, "rss_dir": str(rss_dir)}
    t0 = time.time()
    trainer_for(t, config, legacy).fit()
    wall = time.time() - t0
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    hist = [json.loads(x) for x in Path(TrainDir(str(out)).metrics_jsonl).read_text().splitlines()]
    workers = sorted((json.loads(p.read_text()) for p in rss_dir.glob("rank*.json")), key=lambda w: w["rank"])
    return {
        "driver_peak_rss_mb": round(driver_mb, 1),
        "workers": workers,
        "wall_s": round(wall, 1),
    } | steps_summary(hist)


def steps_summary(hist: list[dict]) -> dict:
    """Rank 0's steady steps (after the first 3, none that checkpointed): data wait against step time."""
    steady = [r for r in hist[3:] if "checkpointed" not in r]
    wait = [r["data_wait_s"] for r in steady]
    step = [r["step_time_s"] for r in steady]
    return {
        "steps_measured": len(steady),
        "data_s_before_first_step": round(hist[0]["data_s"], 3),
        "step_time_s_median": round(statistics.median(step), 5),
        "data_wait_s_median": round(statistics.median(wait), 6),
        "data_wait_s_max": round(max(wait), 6),
        "data_wait_share_of_step_time": round(sum(wait) / sum(step), 5),
    }


# ---- all scenarios ------------------------------------------------------------------------------------


def run_scenario(data_dir: str, out: Path, steps: int, legacy: bool) -> dict:
    """drive() in a fresh Python process (its peak RSS is this scenario's alone); its JSON back. One
    retry: on a loaded machine a local Ray sometimes times out while starting."""
    result = out / "result.json"
    cmd = [sys.executable, __file__, "--drive", data_dir, "--run-out", str(out), "--steps", str(steps)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for attempt in range(2):
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run(
            [*cmd, *(["--in-memory"] if legacy else [])], env=env, stdout=subprocess.DEVNULL
        )
        if done.returncode == 0:
            return json.loads(result.read_text())
        print(f"{out.name}: driver exited {done.returncode} (attempt {attempt + 1})", flush=True)
    raise RuntimeError(f"{out.name} failed twice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", type=float, default=1e9, help="tokens of the large corpus (shards only)")
    parser.add_argument("--small", type=float, default=1e7, help="tokens of the small corpus (both paths)")
    parser.add_argument("--legacy", type=float, default=1e8, help="the largest corpus run on the old path")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", default="/tmp/raylm-bench-train-data")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "train_data.json"))
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # internal: run one scenario in this process
    parser.add_argument("--run-out", help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        result = drive(args.drive, Path(args.run_out), args.steps, args.in_memory)
        Path(args.run_out, "result.json").write_text(json.dumps(result))
        return

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer = make_tokenizer(work)
    scenarios = [("shards", args.small), ("in_memory", args.small), ("in_memory", args.legacy)]
    scenarios += [("shards", args.legacy), ("shards", args.big)]
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {memory_gib:.0f} GiB",
        "setup": {
            "seq_len": SEQ_LEN,
            "vocab": tokenizer[1],
            "dtype": "uint16",
            "workers": 2,
            "global_batch": 8,
            "steps": args.steps,
        },
        "scenarios": [],
    }
    data: dict[int, str] = {}
    for path, tokens in scenarios:
        tokens = int(tokens)
        if tokens not in data:
            t0 = time.time()
            data[tokens] = make_curated(work / f"data-{tokens}", tokens, tokenizer)
            print(f"wrote {tokens:,} tokens in {time.time() - t0:.0f}s", flush=True)
        name = f"{path}-{tokens:.0e}"
        r = {"path": path, "tokens": tokens, "shard_bytes": tokens * 2} | run_scenario(
            data[tokens], work / name, args.steps, path == "in_memory"
        )
        results["scenarios"].append(r)
        print(name, json.dumps(r), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
