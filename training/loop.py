"""The per-worker training loop: the one place in raylm that knows about ranks (principle 6).

`train_loop_per_worker(config)` runs under Ray Train's TorchTrainer (training/run.py) and under plain
torchrun (`torchrun --nproc-per-node 2 -m training.loop CONFIG.json`), with the same data order, model,
DeepSpeed engine, checkpoints and metrics, so the two can be compared side by side.

One step: every rank takes its share of the global batch (training/data.py), runs `grad_accum` micro
batches through the DeepSpeed engine, and the ranks then agree (one all-reduce) on whether to stop early
(SIGTERM, or Ray's preemption notice). A stop takes a checkpoint at that step boundary and raises
`Preempted`, so Ray Train's FailureConfig restarts the group from that checkpoint and no step is lost.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core import metrics
from training import checkpoint as ckpt
from training.config import TrainConfig
from training.data import GlobalSampler, shard_files, tokens_from_files, tokens_from_ray
from training.deepspeed import ds_config
from training.model import build_model, cosine_lr_lambda, count_params, flops_per_token, param_groups

H100_BF16_DENSE_FLOPS = 989e12


class Preempted(RuntimeError):
    """Raised after the stop checkpoint so the run restarts (Ray Train) from it instead of finishing."""


class StopRequest:
    """Set by SIGTERM (or a preemption notice); read at the next step boundary."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.event.set()


def install_sigterm(stop: StopRequest, under_ray: bool) -> None:
    """Turn the first SIGTERM into a stop request; a second one exits as before.

    Under torchrun the loop owns the main thread and installs a handler. Ray Train runs the loop in a
    thread of the worker actor, where signal.signal is not allowed; Ray's own worker handler (set on the
    main thread) calls ray._private.worker.raise_sys_exit_with_custom_error_message, which is wrapped here
    so that the first SIGTERM becomes a stop request instead of an immediate exit.
    """
    if not under_ray:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            if stop.event.is_set() and callable(previous):
                previous(signum, frame)
            stop.set("SIGTERM")

        signal.signal(signal.SIGTERM, handler)
        return
    import ray._private.worker as ray_worker

    original = ray_worker.raise_sys_exit_with_custom_error_message
    if getattr(original, "_raylm", False):
        return

    def intercept(message: str, exit_code: int = 1):
        if "SIGTERM" in message and not stop.event.is_set():
            stop.set("SIGTERM")
            return
        original(message, exit_code)

    intercept._raylm = True  # type: ignore[attr-defined]
    ray_worker.raise_sys_exit_with_custom_error_message = intercept


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """CPU: the fp32 matmul rate this worker reaches (a 512^3 GEMM, best of 5), used as MFU's peak."""
    a = torch.randn(512, 512, dtype=dtype, device=device)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, time.perf_counter() - t)
    return 4 * 2 * 512**3 / best


def peak_flops(cfg: TrainConfig, device: torch.device) -> tuple[float, str]:
    if cfg.peak_flops:
        return cfg.peak_flops, "train.peak_flops"
    if device.type == "cuda":
        return H100_BF16_DENSE_FLOPS, "H100 bf16 dense spec (989 TFLOP/s)"
    return measured_peak_flops(device, torch.float32), "measured fp32 matmul rate of this CPU worker"


class Runtime:
    """Rank, world, device and the few calls that differ between Ray Train and torchrun."""

    def __init__(self, backend: str, use_gpu: bool):
        self.under_ray = backend == "ray"
        if self.under_ray:
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.local_rank = ctx.get_local_rank()
        else:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        os.environ["RANK"] = str(self.rank)  # core.metrics.log_rank0 reads it
        self.device = torch.device("cuda", self.local_rank) if use_gpu else torch.device("cpu")
        if use_gpu and self.under_ray:
            import ray.train.torch

            self.device = ray.train.torch.get_device()  # the GPU Ray assigned to this worker
        if use_gpu:
            torch.cuda.set_device(self.device)

    def dataset(self, name: str, data_dir: str) -> np.ndarray | None:
        if self.under_ray:
            import ray.train

            try:
                it = ray.train.get_dataset_shard(name)
            except KeyError:  # no such split was passed to the trainer (e.g. no eval shards)
                return None
            return tokens_from_ray(it) if it is not None else None
        files = shard_files(data_dir, name)
        return tokens_from_files(files) if files else None

    def latest_checkpoint(self, storage_dir: str | None):
        """The latest complete checkpoint of this run (after a restart), as a context giving a folder:
        Ray Train's under Ray, the newest step_* with a trainer_state.json in storage_dir under torchrun."""
        if self.under_ray:
            import ray.train

            c = ray.train.get_checkpoint()
            return c.as_directory() if c is not None else None
        if storage_dir and os.path.isdir(storage_dir):
            done = sorted(
                d
                for d in os.listdir(storage_dir)
                if d.startswith("step_") and os.path.exists(os.path.join(storage_dir, d, ckpt.STATE))
            )
            if done:
                return nullcontext(os.path.join(storage_dir, done[-1]))
        return None

    def wake_main_thread(self) -> None:
        """Under Ray Train, Python runs SIGTERM handlers only when the actor's main thread runs Python,
        which otherwise happens at Ray's 2 s health checks; a no-op call on this worker's own actor each
        step lets a SIGTERM reach the loop by the next step boundary."""
        if self.under_ray and getattr(self, "under_ray_wake", True):
            import ray

            try:
                if not hasattr(self, "_self_actor"):
                    self._self_actor = ray.get_runtime_context().current_actor
                self._self_actor.__ray_ready__.remote()
            except Exception:  # best effort: the 2 s health check still delivers the signal
                self.under_ray_wake = False

    def preempted(self) -> bool:
        if not self.under_ray:
            return False
        import ray.train

        return ray.train.get_preemption_info() is not None

    def report(self, metrics_: dict[str, Any], folder: str | None = None, name: str | None = None) -> None:
        if not self.under_ray:
            return
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics_, checkpoint=checkpoint, checkpoint_dir_name=name)


def resume_context(resume_from: str | None):
    """An explicit resume_from as a context giving a local folder (remote URIs are downloaded)."""
    if resume_from and "://" in resume_from:
        import ray.train

        return ray.train.Checkpoint(resume_from).as_directory()
    return nullcontext(resume_from)


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (one tiny all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: torch.Tensor) -> float:
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on this worker. `config` is plain data (so Ray Tune can pass it): "train" (a TrainConfig
    dump), "seed", "seq_len", "backend" ("ray" | "torchrun"), "resume_from", "storage_dir" (torchrun)."""
    t_start = time.time()
    cfg = TrainConfig.model_validate(config["train"])
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported below
    seed, seq_len = int(config["seed"]), int(config["seq_len"])
    rt = Runtime(config.get("backend", "ray"), cfg.use_gpu)
    stop = StopRequest()
    install_sigterm(stop, rt.under_ray)

    import deepspeed

    if not dist.is_initialized():  # Ray Train has set up the process group already; torchrun has not
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    else:
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    t_pg = time.time()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(f"{cfg.data_dir.rstrip('/')}/tokenizer")
    train_tokens = rt.dataset("train", cfg.data_dir)
    eval_tokens = rt.dataset("eval", cfg.data_dir)
    if train_tokens is None or train_tokens.shape[1] != seq_len:
        raise ValueError(f"train shards under {cfg.data_dir}/shards do not hold rows of seq_len={seq_len}")
    sampler = GlobalSampler(len(train_tokens), cfg.global_batch_size, seed)
    t_data = time.time()

    # Resume: Ray's latest checkpoint of this run wins (a restart); else an explicit resume_from.
    resume_ctx = rt.latest_checkpoint(config.get("storage_dir")) or resume_context(config.get("resume_from"))
    with resume_ctx as resume_dir:
        state = ckpt.read_state(resume_dir) if resume_dir else None
        if (
            state is not None
            and state.get("global_batch_size", cfg.global_batch_size) != cfg.global_batch_size
        ):
            raise ckpt.CheckpointReadError(
                f"checkpoint {resume_dir} was trained with global_batch_size {state['global_batch_size']}; "
                f"train.global_batch_size is {cfg.global_batch_size} (the data position is counted in global batches)"
            )
        # ZeRO-0 keeps full, unpartitioned state, which loads on any number of workers as it is.
        universal = state is not None and state["world_size"] != rt.world and state.get("zero_stage", 0) > 0
        ds_cfg = ds_config(cfg, rt.world, load_universal=universal)
        s = cfg.schedule
        precision = cfg.deepspeed.precision
        model = build_model(
            cfg.model,
            cfg.lora,
            tokenizer,
            seq_len,
            seed,
            activation_checkpointing=cfg.deepspeed.activation_checkpointing,
        )
        total_params, trainable_params = count_params(model)
        lr_fn = cosine_lr_lambda(s.warmup_steps, cfg.max_steps, s.min_lr_ratio)
        optimizer = None
        if "optimizer" not in ds_cfg:
            optimizer = torch.optim.AdamW(
                param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps, foreach=False
            )
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=param_groups(model, s.weight_decay) if optimizer is None else None,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn),
            config=ds_cfg,
        )
        t_ds = time.time()

        start_step, history, attempt = 0, [], 0
        if state is not None:
            load_checkpoint(engine, resume_dir, state, universal, rt, s.weight_decay)
            start_step, history, attempt = (
                int(state["step"]),
                list(state.get("history", [])),
                state.get("attempt", 0) + 1,
            )
            metrics.log_rank0(
                "resumed from %s at step %d (saved by %d workers, now %d%s)",
                resume_dir,
                start_step,
                state["world_size"],
                rt.world,
                ", universal checkpoint" if universal else "",
            )
    # The schedule is a pure function of the step: set it explicitly so every resume path agrees.
    scheduler.last_epoch = start_step - 1
    scheduler.step()
    t_loaded = time.time()

    peak, peak_source = peak_flops(cfg, rt.device)
    fpt = flops_per_token(
        engine.module.config if not cfg.lora.enabled else engine.module.base_model.model.config, seq_len
    )
    metrics.log_rank0(
        "training %s params (%s trainable) on %d workers, ZeRO-%d %s, accum %d, MFU peak %.3g FLOP/s (%s)",
        f"{total_params:,}",
        f"{trainable_params:,}",
        rt.world,
        cfg.deepspeed.zero_stage,
        precision,
        ds_cfg["gradient_accumulation_steps"],
        peak,
        peak_source,
    )
    setup = {
        "t_loop_start": t_start,
        "pg_s": t_pg - t_start,
        "data_s": t_data - t_pg,
        "ds_init_s": t_ds - t_data,
        "ckpt_load_s": t_loaded - t_ds if state is not None else 0.0,
        "attempt": attempt,
    }

    accum = ds_cfg["gradient_accumulation_steps"]
    mb = cfg.micro_batch_size
    tags = {"run": config.get("run_id", "train")}
    preempt_every = cfg.checkpoint.preemption_check_every
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        engine.train()
        rows = sampler.rank_rows(step, rt.rank, rt.world)
        losses = []
        for m in range(accum):
            x = torch.from_numpy(train_tokens[rows[m * mb : (m + 1) * mb]]).long().to(rt.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        loss = mean_over_ranks(torch.stack(losses).mean())
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        step_time = time.perf_counter() - t0
        done = step + 1

        rt.wake_main_thread()
        notice = rt.preempted() if rt.under_ray and done % preempt_every == 0 else False
        stopping = agree(stop.event.is_set() or notice, rt.device)
        tokens_per_s = cfg.global_batch_size * seq_len / step_time
        row = {
            "step": done,
            "loss": loss,
            "lr": s.lr * lr_fn(step),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": fpt * tokens_per_s / (peak * rt.world),
            "step_time_s": step_time,
            "t_wall": time.time(),
            "attempt": attempt,
            "world_size": rt.world,
        }
        if rt.rank == 0:
            row["sample_rows_sha"] = _rows_digest(sampler.global_batch_rows(step))
        if step == start_step:
            row.update(setup, first_step_wall=time.time())
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
            row.update(evaluate(engine, eval_tokens, cfg, rt))
        history.append(row)
        emit_metrics(row, tags)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            metrics.log_rank0(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f MFU %.2f%% step %.3fs%s",
                done,
                cfg.max_steps,
                loss,
                row["lr"],
                grad_norm,
                tokens_per_s,
                100 * row["mfu"],
                step_time,
                f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else "",
            )

        if done % cfg.checkpoint.every_steps == 0 or done == cfg.max_steps or stopping:
            t_ck = time.perf_counter()
            row["checkpointed"] = True
            save_checkpoint(engine, cfg, rt, done, sampler, history, seed, attempt, config, row)
            row["checkpoint_s"] = time.perf_counter() - t_ck
            metrics.histogram("train_checkpoint_seconds", row["checkpoint_s"], tags, "checkpoint save time")
        elif done % cfg.log_every == 0:
            rt.report(_scalars(row))
        if stopping:
            reason = stop.reason or "a stop request on another rank"
            metrics.log_rank0(
                "stopping at step %d (%s): checkpoint taken, the run restarts from it", done, reason
            )
            raise Preempted(f"stopped at step {done} by {reason}; checkpoint step_{done:08d} is complete")

    if cfg.export:
        from training.export import export_model

        export_model(engine, tokenizer, cfg, config, rt.rank)
    if rt.rank == 0:
        from training.plots import write_history

        write_history(history, cfg.output)
    dist.barrier()


def _rows_digest(rows: np.ndarray) -> str:
    import hashlib

    return hashlib.blake2b(np.sort(rows).astype(np.int64).tobytes(), digest_size=8).hexdigest()


def _scalars(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str))}


def emit_metrics(row: dict[str, Any], tags: dict[str, str]) -> None:
    if metrics.rank() != 0:
        return
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "step_time_s",
        "eval_loss",
        "eval_perplexity",
    ):
        if key in row and math.isfinite(row[key]):
            metrics.gauge(f"train_{key}", row[key], tags, f"training {key}")
    metrics.counter("train_steps_total", 1, tags, "optimizer steps taken")
    metrics.histogram("train_step_seconds", row["step_time_s"], tags, "optimizer step time")


@torch.no_grad()
def evaluate(engine, eval_tokens: np.ndarray | None, cfg: TrainConfig, rt: Runtime) -> dict[str, float]:
    """Mean token loss and perplexity on the held-out split; every rank runs the same number of
    batches (ZeRO-3 forwards are collectives)."""
    if eval_tokens is None:
        return {}
    mb = cfg.micro_batch_size
    n = min(cfg.eval_batches, len(eval_tokens) // (mb * rt.world))
    if n == 0:
        return {}
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(n):
        start = (i * rt.world + rt.rank) * mb
        x = torch.from_numpy(eval_tokens[start : start + mb]).long().to(rt.device)
        loss = engine(input_ids=x, labels=x).loss.float().cpu()
        total += torch.tensor([loss.item() * x.numel(), x.numel()], dtype=torch.float64)
    total = total.to(rt.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    engine.train()
    eval_loss = (total[0] / total[1]).item()
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))}


def save_checkpoint(
    engine,
    cfg: TrainConfig,
    rt: Runtime,
    step: int,
    sampler: GlobalSampler,
    history: list[dict[str, Any]],
    seed: int,
    attempt: int,
    config: dict[str, Any],
    row: dict[str, Any],
) -> None:
    state = {
        "step": step,
        "world_size": rt.world,
        "seed": seed,
        "attempt": attempt,
        "zero_stage": cfg.deepspeed.zero_stage,
        "data_position": sampler.position(step),
        "global_batch_size": cfg.global_batch_size,
        "history": history,
    }
    name = ckpt.step_dir_name(step)
    if rt.under_ray:
        with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as folder:
            _write_checkpoint(engine, folder, rt.rank, state)
            rt.report(_scalars(row) | {"checkpoint_step": step}, folder, name)
        return
    root = config["storage_dir"]
    folder = os.path.join(root, name)
    _write_checkpoint(engine, folder, rt.rank, state, barrier_before_state=True)
    if rt.rank == 0:  # keep the last K complete checkpoints
        done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
        for old in done[: -cfg.checkpoint.keep_last]:
            import shutil

            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def _write_checkpoint(
    engine, folder: str, rank: int, state: dict[str, Any], barrier_before_state: bool = False
) -> None:
    os.makedirs(folder, exist_ok=True)
    engine.save_checkpoint(folder, tag=ckpt.DS_TAG, save_latest=True)
    ckpt.save_rng(folder, rank)
    if barrier_before_state:
        dist.barrier()  # trainer_state.json last: the checkpoint is complete only once every rank wrote
    if rank == 0:
        ckpt.write_state(folder, state)


def load_checkpoint(
    engine, folder: str, state: dict[str, Any], universal: bool, rt: Runtime, weight_decay: float
) -> None:
    try:
        if universal:
            with tempfile.TemporaryDirectory(prefix="raylm-universal-") as tmp:
                load_dir = ckpt.to_universal(folder, tmp)
                path, _ = engine.load_checkpoint(
                    load_dir, tag=ckpt.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
                )
        else:
            path, _ = engine.load_checkpoint(
                folder, tag=ckpt.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
    except Exception as exc:
        raise ckpt.CheckpointReadError(
            f"checkpoint {folder} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    if path is None:
        raise ckpt.CheckpointReadError(
            f"checkpoint {folder} cannot be read: DeepSpeed found no state under {ckpt.DS_TAG}/"
        )
    if universal:
        # A universal checkpoint stores one set of optimizer hyperparameters for all groups; put back the
        # per-group weight decay of model.param_groups (decayed matrices, then undecayed vectors).
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for group, decay in zip(inner.param_groups, (weight_decay, 0.0), strict=False):
            group["weight_decay"] = decay
        # DeepSpeed 0.19.8's universal load gives every param group the *same* `step` tensor, so torch's
        # AdamW bumps it once per group per step and bias correction drifts (found by the 2 -> 1 test).
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    if not ckpt.load_rng(folder, rt.rank):
        torch.manual_seed(state["seed"] + 1000 * rt.rank + state["step"])


def main(argv: list[str] | None = None) -> int:
    """torchrun entry point: `torchrun --nproc-per-node N -m training.loop CONFIG.json` (written by
    run.py's `torchrun_config` or benchmarks/train.py)."""
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s raylm %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    argv = argv if argv is not None else sys.argv[1:]
    with open(argv[0]) as f:
        config = json.load(f)
    config["backend"] = "torchrun"
    try:
        train_loop_per_worker(config)
    except Preempted as exc:
        print(f"raylm: {exc}", file=sys.stderr)
        return 143
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
