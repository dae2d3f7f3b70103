"""The training loop, written as setup -> step -> report, the same wherever it runs.

`train(config, runtime, report)` trains on one rank. The runtime (training/runtime.py) says where that
is: a Ray Train worker, a torchrun process, or this process alone. The caller injects
`report(metrics, checkpoint_dir)`, which every rank calls after every step (so a Ray Tune scheduler
such as ASHA sees each step): Ray Train's calls ray.train.report, torchrun's keeps the last K step_*
folders (training/torchrun.py), a Tune trial passes its own. `checkpoint_dir` is set on checkpoint
steps and exists only during the call.

One step: every rank reads its share of the global batch from the token shards (training/data.py; the
next step's share is read ahead while this one computes), runs `grad_accum` micro batches through the
DeepSpeed engine, and the ranks then agree (one all-reduce) on whether to stop early (SIGTERM, or Ray's
preemption notice). Evaluation runs every `eval_every` steps and at the end. A stop
takes a checkpoint at that step boundary and raises `Preempted`, so Ray Train's FailureConfig restarts
the group from that checkpoint and no step is lost.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from raylm.core import metrics, storage, tracking
from raylm.core.artifacts import CuratedDir, TrainDir
from raylm.training import checkpoint as ckpt
from raylm.training import progress
from raylm.training.config import TrainConfig
from raylm.training.data import GlobalSampler, TokenShards
from raylm.training.deepspeed import ds_config
from raylm.training.mfu import Mfu, mfu_meter
from raylm.training.model import build_model, cosine_lr_lambda, count_params, param_groups
from raylm.training.runtime import InProcess, RayTrain, Runtime, ray_train_report

Report = Callable[[dict[str, Any], str | None], None]
# The loss of one micro batch: (engine, token ids) -> a scalar to backpropagate. Plain next-token
# cross-entropy, or knowledge distillation's mix with a frozen teacher (training/distill.py).
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def lm_loss(engine, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the model being trained (HF shifts the labels)."""
    return engine(input_ids=x, labels=x).loss


class Preempted(RuntimeError):
    """Raised after the stop checkpoint so the run restarts (Ray Train) from it instead of finishing."""


@dataclass
class TrainingRun:
    """What setup built and the steps read: config, data, engine, and where the run stands."""

    cfg: TrainConfig
    config: dict[str, Any]  # the plain-data loop config (export writes it to its manifest)
    rt: Runtime
    run_name: str
    seed: int
    seq_len: int
    tokenizer: Any
    train_tokens: TokenShards
    eval_tokens: TokenShards | None
    sampler: GlobalSampler
    engine: Any
    lr_fn: Callable[[int], float]
    mfu: Mfu
    loss_fn: LossFn = lm_loss
    start_step: int = 0
    attempt: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    setup_times: dict[str, float] = field(default_factory=dict)
    data_wait_s: float = 0.0  # of the last step: this rank's wait for its rows (part of step_time_s)
    last_eval: dict[str, float] = field(default_factory=dict)

    @property
    def accum(self) -> int:
        """Micro batches per optimizer step on each rank (DeepSpeed's count, from training/deepspeed.py)."""
        return self.engine.gradient_accumulation_steps()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point (TorchTrainer, training/run.py)."""
    # DeepSpeed's ZeRO-3 collectives call torch.distributed functions torch has deprecated: a warning per
    # call site per worker, forwarded to the driver's console, that no raylm user can act on.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    train(config, RayTrain(), ray_train_report(config["train"]["report_every"]))


def train_in_process(config: dict[str, Any], report: Report) -> list[dict[str, Any]]:
    """Train in this process alone (world size 1): what a Ray Tune trial that is not a TorchTrainer
    calls. Checkpoints go to config["storage_dir"] when set (a rerun continues from the newest)."""
    return train(config, InProcess(config.get("storage_dir")), report)


def train(config: dict[str, Any], rt: Runtime, report: Report) -> list[dict[str, Any]]:
    """Train on this rank. `config` is plain data (so Ray Tune can pass it): "train" (a TrainConfig
    dump), "seed", "seq_len", "run_name" (metric tags), "resume_from", "storage_dir", "tracking" (an
    MLflow run for rank 0's per-step metrics, core/tracking.py's RunRef as a dict; optional), "distill"
    (teacher, temperature, alpha: train against a teacher's logits, training/distill.py; optional).
    Returns the history (one row per step, since the first step of the first attempt)."""
    t_start = time.time()
    cfg = TrainConfig.model_validate(config["train"])
    run = None
    try:
        rt.start(cfg.use_gpu)
        run = setup(cfg, config, rt, t_start)
        # config["tracking"]: the MLflow run (core/tracking.py) that rank 0 logs each step to, when set
        steps = tracking.StepLogger(config.get("tracking"), rt.rank)
        for step in range(run.start_step, cfg.max_steps):
            loss, grad_norm, step_time = optimizer_step(run, step)
            stopping = rt.stop_requested(step + 1, cfg.checkpoint.preemption_check_every)
            row = step_row(run, step, loss, grad_norm, step_time)
            progress.log_step(row, cfg.max_steps, cfg.log_every)
            publish(run, row, report, checkpoint=stopping or checkpoint_due(cfg, step + 1))
            steps.log(row)
            if stopping:
                steps.flush()
                raise preempted(rt, step + 1)
        steps.flush()
        finish(run)
        return run.history
    finally:
        if run is not None:  # the read-ahead thread and open shard files
            run.train_tokens.close()
            if run.eval_tokens is not None:
                run.eval_tokens.close()
        rt.close()


def preempted(rt: Runtime, done: int) -> Preempted:
    reason = rt.stop.reason or "a stop request on another rank"
    metrics.log_rank0("stopping at step %d (%s): checkpoint taken, the run restarts from it", done, reason)
    return Preempted(f"stopped at step {done} by {reason}; checkpoint {ckpt.step_dir_name(done)} is complete")


# ---- setup ----------------------------------------------------------------------------------------


def setup(cfg: TrainConfig, config: dict[str, Any], rt: Runtime, t_start: float) -> TrainingRun:
    """Data, model, engine, and the checkpoint to continue from (a restart's, else resume_from)."""
    t_pg = time.time()  # rt.start() made the process group
    from transformers import AutoTokenizer

    seed, seq_len = int(config["seed"]), int(config["seq_len"])
    with storage.local_copy(CuratedDir(cfg.data_dir).tokenizer) as local:  # s3:// is no Hub id
        tokenizer = AutoTokenizer.from_pretrained(local)
    train_tokens, eval_tokens = load_tokens(cfg, rt, seq_len)
    sampler = GlobalSampler(len(train_tokens), cfg.global_batch_size, seed)
    t_data = time.time()
    with resume_folder(config, rt) as folder:
        resume = ckpt.open_resume(folder, rt.world, cfg.global_batch_size) if folder else None
        engine, lr_fn, params = build_engine(cfg, rt.world, tokenizer, seq_len, seed, resume)
        t_ds = time.time()
        if resume is not None:
            ckpt.load(engine, resume, rt.rank, cfg.schedule.weight_decay)
            log_resume(resume, rt.world)
    start_step = resume.state.step if resume else 0
    # The schedule is a pure function of the step: set it explicitly so every resume path agrees.
    engine.lr_scheduler.last_epoch = start_step - 1
    with warnings.catch_warnings():  # torch's "scheduler stepped before the optimizer": here it sets the lr
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        engine.lr_scheduler.step()
    t_loaded = time.time()
    run = TrainingRun(
        cfg=cfg,
        config=config,
        rt=rt,
        run_name=config.get("run_name") or cfg.checkpoint.run_name,
        seed=seed,
        seq_len=seq_len,
        tokenizer=tokenizer,
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        sampler=sampler,
        engine=engine,
        lr_fn=lr_fn,
        mfu=mfu_meter(cfg, engine.module, seq_len, rt.device, rt.world),
        loss_fn=build_loss_fn(cfg, config, rt),
        start_step=start_step,
        attempt=resume.state.attempt + 1 if resume else 0,
        history=list(resume.state.history) if resume else [],
    )
    run.last_eval = progress.latest_eval(run.history)
    progress.emit_restart(run.run_name, run.attempt, start_step, rt.rank)
    run.setup_times = {
        "t_loop_start": t_start,
        "pg_s": t_pg - t_start,
        "data_s": t_data - t_pg,
        "ds_init_s": t_ds - t_data,
        "ckpt_load_s": t_loaded - t_ds if resume is not None else 0.0,
        "attempt": run.attempt,
    }
    log_start(run, params)
    return run


def build_loss_fn(cfg: TrainConfig, config: dict[str, Any], rt: Runtime) -> LossFn:
    """The loss of a micro batch: cross-entropy, or with a "distill" block the mix with a teacher's
    logits (the teacher loads here, on this rank's device, outside DeepSpeed). alpha 0 is the
    cross-entropy alone: no teacher is loaded."""
    if not config.get("distill") or config["distill"]["alpha"] == 0:
        return lm_loss
    from raylm.training.distill import DistillLoss

    return DistillLoss(config["distill"], rt.device, cfg.deepspeed.precision)


def load_tokens(cfg: TrainConfig, rt: Runtime, seq_len: int) -> tuple[TokenShards, TokenShards | None]:
    """The train and eval splits' shards, opened (their index read), not loaded."""
    train_tokens = rt.dataset(cfg.train_split, cfg.data_dir)
    if train_tokens is None or train_tokens.shape[1] != seq_len:
        raise ValueError(
            f"{cfg.train_split} shards under {cfg.data_dir}/shards do not hold rows of seq_len={seq_len}"
        )
    return train_tokens, rt.dataset(cfg.eval_split, cfg.data_dir)


def resume_folder(config: dict[str, Any], rt: Runtime) -> AbstractContextManager[str | None]:
    """The runtime's latest checkpoint of this run wins (a restart); else an explicit resume_from."""
    return rt.latest_checkpoint() or ckpt.local_folder(config.get("resume_from"))


def build_engine(cfg: TrainConfig, world: int, tokenizer, seq_len: int, seed: int, resume):
    """The model (seeded: every rank and restart builds the same weights) in a DeepSpeed engine with
    AdamW and the warmup + cosine schedule. Returns (engine, lr multiplier, (total, trainable) params)."""
    import deepspeed

    ds_cfg = ds_config(cfg, world, load_universal=resume is not None and resume.universal)
    s = cfg.schedule
    model = build_model(
        cfg.model,
        cfg.lora,
        tokenizer,
        seq_len,
        seed,
        activation_checkpointing=cfg.deepspeed.activation_checkpointing,
    )
    params = count_params(model)
    lr_fn = cosine_lr_lambda(s.warmup_steps, cfg.max_steps, s.min_lr_ratio)
    optimizer = None
    if "optimizer" not in ds_cfg:  # else DeepSpeed builds its CPU Adam (optimizer offload)
        optimizer = torch.optim.AdamW(
            param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps, foreach=False
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=param_groups(model, s.weight_decay) if optimizer is None else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn),
        config=ds_cfg,
    )
    return engine, lr_fn, params


def log_resume(resume: ckpt.Resume, world: int) -> None:
    metrics.log_rank0(
        "resumed from %s at step %d (saved by %d workers, now %d%s)",
        resume.folder,
        resume.state.step,
        resume.state.world_size,
        world,
        ", universal checkpoint" if resume.universal else "",
    )


def log_start(run: TrainingRun, params: tuple[int, int]) -> None:
    cfg = run.cfg
    metrics.log_rank0(
        "training run %s: %s params (%s trainable) on %d workers, ZeRO-%d %s, accum %d, "
        "MFU peak %.3g FLOP/s (%s)",
        run.run_name,
        f"{params[0]:,}",
        f"{params[1]:,}",
        run.rt.world,
        cfg.deepspeed.zero_stage,
        cfg.deepspeed.precision,
        run.accum,
        run.mfu.peak,
        run.mfu.peak_source,
    )


# ---- step ------------------------------------------------------------------------------------------


def optimizer_step(run: TrainingRun, step: int) -> tuple[float, float, float]:
    """This rank's share of step's global batch through the engine in `accum` micro batches (DeepSpeed
    steps the optimizer after the last). Returns (loss averaged over ranks, grad norm, seconds)."""
    t0 = time.perf_counter()
    engine, mb, rt = run.engine, run.cfg.micro_batch_size, run.rt
    engine.train()
    wait_before = run.train_tokens.wait_s
    batch = run.train_tokens[run.sampler.rank_rows(step, rt.rank, rt.world)]  # read ahead last step
    if step + 1 < run.cfg.max_steps:
        run.train_tokens.prefetch(run.sampler.rank_rows(step + 1, rt.rank, rt.world))
    run.data_wait_s = run.train_tokens.wait_s - wait_before
    losses = []
    for m in range(run.accum):
        x = torch.from_numpy(batch[m * mb : (m + 1) * mb]).long().to(rt.device)
        loss = run.loss_fn(engine, x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    loss = rt.mean(torch.stack(losses).mean())
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    return loss, grad_norm, time.perf_counter() - t0


def step_row(run: TrainingRun, step: int, loss: float, grad_norm: float, step_time: float) -> dict[str, Any]:
    """The history row of a step (plus the evaluation, when one is due), appended to the history."""
    cfg, done = run.cfg, step + 1
    tokens_per_s = cfg.global_batch_size * run.seq_len / step_time
    row = {
        "step": done,
        "loss": loss,
        "lr": cfg.schedule.lr * run.lr_fn(step),
        "grad_norm": grad_norm,
        "tokens": done * cfg.global_batch_size * run.seq_len,
        "tokens_per_s": tokens_per_s,
        "mfu": run.mfu(tokens_per_s),
        "step_time_s": step_time,
        "data_wait_s": run.data_wait_s,
        "t_wall": time.time(),
        "attempt": run.attempt,
        "world_size": run.rt.world,
    }
    if run.rt.rank == 0:
        row["sample_rows_sha"] = run.sampler.digest(step)
    if step == run.start_step:
        row.update(run.setup_times, first_step_wall=time.time())
    if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
        run.last_eval = evaluate(run)
        row.update(run.last_eval)
    run.history.append(row)
    return row


def checkpoint_due(cfg: TrainConfig, done: int) -> bool:
    return done % cfg.checkpoint.every_steps == 0 or done == cfg.max_steps


def publish(run: TrainingRun, row: dict[str, Any], report: Report, checkpoint: bool) -> None:
    """Gauges (rank 0), then `report` on every rank; on a checkpoint step the checkpoint is written
    first and reported with the metrics."""
    if checkpoint:
        row["checkpointed"] = True
    reported = progress.reported_metrics(row, run.last_eval, run.run_name)
    progress.emit_metrics(reported, run.rt.rank)
    if not checkpoint:
        report(reported, None)
        return
    t0 = time.perf_counter()
    with run.rt.checkpoint_folder(row["step"]) as folder:
        ckpt.save(run.engine, folder, train_state(run, row["step"]), run.rt.rank)
        report(reported | {"checkpoint_step": row["step"]}, folder)
    row["checkpoint_s"] = time.perf_counter() - t0
    metrics.record(metrics.TRAIN_CHECKPOINT_SECONDS, row["checkpoint_s"], {"run": run.run_name})


def train_state(run: TrainingRun, done: int) -> ckpt.TrainState:
    return ckpt.TrainState(
        step=done,
        world_size=run.rt.world,
        seed=run.seed,
        attempt=run.attempt,
        zero_stage=run.cfg.deepspeed.zero_stage,
        data_position=run.sampler.position(done),
        global_batch_size=run.cfg.global_batch_size,
        history=run.history,
    )


@torch.no_grad()
def evaluate(run: TrainingRun) -> dict[str, float]:
    """Mean token loss and perplexity on the held-out split; every rank runs the same number of
    batches (ZeRO-3 forwards are collectives)."""
    if run.eval_tokens is None:
        return {}
    mb, rt, engine = run.cfg.micro_batch_size, run.rt, run.engine
    n = min(run.cfg.eval_batches, len(run.eval_tokens) // (mb * rt.world))
    if n == 0:
        return {}
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(n):
        start = (i * rt.world + rt.rank) * mb
        x = torch.from_numpy(run.eval_tokens[start : start + mb]).long().to(rt.device)
        loss = engine(input_ids=x, labels=x).loss.float().cpu()
        total += torch.tensor([loss.item() * x.numel(), x.numel()], dtype=torch.float64)
    total = rt.all_sum(total)
    engine.train()
    eval_loss = (total[0] / total[1]).item()
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))}


# ---- end -------------------------------------------------------------------------------------------


@torch.no_grad()
def write_probe_logits(run: TrainingRun) -> None:
    """The final model's logits on the first PROBE_TOKENS tokens of the first eval (else train) row, so a
    loaded export (or a served adapter) can be compared with what training had in memory."""
    from safetensors.torch import save

    tokens = run.eval_tokens if run.eval_tokens is not None else run.train_tokens
    x = torch.from_numpy(tokens[:1, :PROBE_TOKENS]).long().to(run.rt.device)
    run.engine.eval()
    logits = run.engine(input_ids=x).logits.float().cpu()
    if run.rt.rank == 0:
        probe = save({"input_ids": x.cpu(), "logits": logits.contiguous()})
        storage.write_bytes(TrainDir(run.cfg.output).probe_logits, probe)


PROBE_TOKENS = 32


def finish(run: TrainingRun) -> None:
    """Probe logits and export (collectives under ZeRO-3), then metrics.jsonl and the loss curve from
    rank 0."""
    write_probe_logits(run)
    if run.cfg.export:
        from raylm.training.export import export_model

        export_model(run.engine, run.tokenizer, run.cfg, run.config, run.rt.rank)
    if run.rt.rank == 0:
        from raylm.training.plots import write_history

        write_history(run.history, run.cfg.output)
    run.rt.barrier()


if __name__ == "__main__":  # `torchrun ... -m training.loop CONFIG.json`, as before training/torchrun.py
    from raylm.training.torchrun import main

    sys.exit(main())
