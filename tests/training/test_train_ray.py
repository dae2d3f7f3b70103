"""End-to-end training on Ray Train: 2 CPU workers, gloo, DeepSpeed ZeRO-3, a tiny Llama.

One uninterrupted run (module fixture) is the reference for the others: a single-process PyTorch run on
the same global batches, a run whose worker is SIGKILLed, one whose worker gets SIGTERM, and a resume on
one worker from its step-8 checkpoint.
"""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from train_helpers import history, signal_after_checkpoints, tiny_run

from raylm.core.artifacts import CuratedDir, TrainDir
from raylm.training import checkpoint as ckpt
from raylm.training.run import run, storage_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_run(ray_cluster, curated_dir, tmp_path_factory):
    cfg = tiny_run(curated_dir, tmp_path_factory.mktemp("ref"))
    before = signal.getsignal(signal.SIGINT)
    manifest = run(cfg)
    # Ray Train leaves its own SIGINT handler behind; run() must restore ours, or Ctrl-C could not
    # stop the serve stage that `raylm run` starts after training.
    assert signal.getsignal(signal.SIGINT) is before
    return cfg, manifest, history(cfg)


def single_process_losses(cfg, curated_dir: str, steps: int) -> list[float]:
    """The same optimisation in one process with plain PyTorch: whole global batch per step."""
    from transformers import AutoTokenizer

    from raylm.training.data import GlobalSampler, TokenShards
    from raylm.training.model import build_model, cosine_lr_lambda, param_groups

    t = cfg.train
    tok = AutoTokenizer.from_pretrained(CuratedDir(curated_dir).tokenizer)
    tokens = TokenShards.open(curated_dir, "train")[:]
    model = build_model(t.model, t.lora, tok, tokens.shape[1], seed=cfg.seed)
    s = t.schedule
    opt = torch.optim.AdamW(
        param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps, foreach=False
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_lr_lambda(s.warmup_steps, t.max_steps, s.min_lr_ratio)
    )
    sampler = GlobalSampler(len(tokens), t.global_batch_size, cfg.seed)
    losses = []
    for step in range(steps):
        x = torch.from_numpy(tokens[sampler.global_batch_rows(step)]).long()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.deepspeed.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_zero3_two_workers_match_single_process(reference_run, curated_dir):
    cfg, manifest, hist = reference_run
    ours = [r["loss"] for r in hist]
    assert [r["step"] for r in hist] == list(range(1, 13))
    ref = single_process_losses(cfg, curated_dir, 12)
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True)]
    assert max(rel) < 1e-5, rel
    assert ours[-1] < ours[0]  # it learns
    # metrics promised per step, eval at 6 and 12, a manifest linking back to the curated data
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"):
        assert all(math.isfinite(r[key]) for r in hist), key
    assert [r["step"] for r in hist if "eval_loss" in r] == [6, 12]
    assert "checkpoint_s" in hist[3]
    assert manifest["parents"] == [f"{curated_dir}/manifest.json"]
    assert manifest["final"]["step"] == 12
    assert os.path.getsize(TrainDir(cfg.train.output).loss_curve) > 1000
    # keep_last=3: steps 4, 8, 12 kept, each with every rank's shards
    run_dir = os.path.join(storage_path(cfg.train), "run")
    kept = sorted(d for d in os.listdir(run_dir) if d.startswith("step_"))
    assert kept == ["step_00000004", "step_00000008", "step_00000012"]
    assert ckpt.read_state(os.path.join(run_dir, "step_00000008"))["data_position"] == {
        "epoch": 0,
        "offset": 64,
    }


def test_export_round_trip(reference_run, curated_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, _ = reference_run
    export = TrainDir(cfg.train.output).export.root
    tensors = load_file(os.path.join(export, "model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    model = AutoModelForCausalLM.from_pretrained(export)
    AutoTokenizer.from_pretrained(export)
    # The export's logits equal the trained model's: rebuild it from the last (sharded) checkpoint's
    # fp32 partitions with DeepSpeed's own consolidation and compare.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    last = os.path.join(storage_path(cfg.train), "run", "step_00000012")
    state = get_fp32_state_dict_from_zero_checkpoint(last, tag=ckpt.DS_TAG)
    trained = AutoModelForCausalLM.from_config(model.config)
    trained.load_state_dict(state, strict=False)
    x = torch.from_numpy(np.arange(1, 33, dtype=np.int64)[None])
    with torch.no_grad():
        assert torch.equal(model(x).logits, trained(x).logits)


def test_sigterm_then_sigkill_recover_bitwise(reference_run, curated_dir, tmp_path):
    """SIGTERM one worker after checkpoint 4, then SIGKILL one of the restarted workers after checkpoint 8.
    SIGTERM: all ranks stop at the next step boundary with a checkpoint, so the restart loses no step.
    SIGKILL: Ray Train restarts the group from checkpoint 8 by itself. Either way the losses equal the
    uninterrupted run's bit for bit, and every step's global batch is the same set of samples."""
    _, _, ref = reference_run
    cfg = tiny_run(curated_dir, tmp_path)
    run_dir = os.path.join(storage_path(cfg.train), "run")
    watcher, sent = signal_after_checkpoints(
        [
            (os.path.join(run_dir, "step_00000004"), signal.SIGTERM),
            (os.path.join(run_dir, "step_00000008"), signal.SIGKILL),
        ]
    )
    run(cfg)
    watcher.join(5)
    assert [s["sig"] for s in sent] == [signal.SIGTERM, signal.SIGKILL], sent
    hist = history(cfg)
    assert [r["step"] for r in hist] == list(range(1, 13))
    attempts = [r["attempt"] for r in hist]
    assert attempts == sorted(attempts) and attempts[-1] == 2, attempts  # two automatic restarts
    # SIGTERM: the last step of attempt 0 took a checkpoint, and attempt 1 started on the next step.
    stop_step = attempts.index(1)  # 1-based step of the last row of attempt 0
    assert stop_step > 4 and hist[stop_step - 1].get("checkpointed"), hist[stop_step - 1]
    # SIGKILL: attempt 2 resumed from the step-8 checkpoint (steps after it were redone, none skipped).
    assert attempts.index(2) == 8
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref]  # bitwise
    assert [r["sample_rows_sha"] for r in hist] == [r["sample_rows_sha"] for r in ref]


def test_resume_on_one_worker_continues_curve(reference_run, curated_dir, tmp_path):
    ref_cfg, _, ref = reference_run
    step8 = os.path.join(storage_path(ref_cfg.train), "run", "step_00000008")
    cfg = tiny_run(curated_dir, tmp_path, num_workers=1, checkpoint={"resume_from": step8}, export=False)
    run(cfg)
    hist = history(cfg)
    assert [r["step"] for r in hist] == list(range(1, 13))
    assert [r["world_size"] for r in hist[8:]] == [1] * 4
    for ours, theirs in zip(hist[8:], ref[8:], strict=True):
        assert abs(ours["loss"] - theirs["loss"]) / theirs["loss"] < 1e-4, (ours["loss"], theirs["loss"])


def test_mlflow_holds_the_run_with_its_config_steps_and_final_metrics(reference_run):
    """The reference run, tracked by default in <run_dir>/mlflow: one run, the train section as params,
    a loss point per step from rank 0, the manifest's final figures, its artifacts and lineage."""
    from mlflow import MlflowClient

    from raylm.core import tracking
    from raylm.core.artifacts import CuratedDir
    from raylm.core.config import dump_config

    cfg, manifest, steps = reference_run
    client = MlflowClient(tracking.local_store(cfg.run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["raylm.stage"] == "train"
    assert run.data.params == tracking.flatten(dump_config(cfg.train))
    final = {k: v for k, v in manifest["final"].items() if isinstance(v, (int, float))}
    assert final and {k: run.data.metrics[f"final.{k}"] for k in final} == pytest.approx(final)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [r["step"] for r in steps]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in steps])
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == sum(
        "eval_loss" in r for r in steps
    )
    parent = CuratedDir(cfg.train.data_dir).manifest
    assert run.data.tags["raylm.parent.0.id"] == tracking.manifest_id(parent)
    assert run.data.tags["raylm.export"] == manifest["export"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"manifest.json", "loss_curve.png", "metrics.jsonl"}
