"""Turn the typed TrainConfig into a DeepSpeed config dict (the only place that knows DeepSpeed's keys)."""

from __future__ import annotations

from typing import Any

from raylm.training.config import TrainConfig


def ds_config(
    cfg: TrainConfig, num_workers: int | None = None, load_universal: bool = False
) -> dict[str, Any]:
    """DeepSpeed config for `num_workers` data-parallel ranks (default cfg.num_workers).

    The global batch is fixed by the recipe; accumulation absorbs a change in the worker count, so a
    run resumed on fewer workers keeps the same optimisation (see training/checkpoint.py).
    """
    workers = num_workers or cfg.num_workers
    per_pass = cfg.micro_batch_size * workers
    if cfg.global_batch_size % per_pass:
        raise ValueError(
            f"global_batch_size ({cfg.global_batch_size}) is not a multiple of micro_batch_size "
            f"({cfg.micro_batch_size}) * num_workers ({workers})"
        )
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if ds.zero_stage == 3:
        # Gather weights for saving only on request (export gathers them itself with GatheredParameters).
        zero.update(
            stage3_gather_16bit_weights_on_model_save=False,
            stage3_param_persistence_threshold=1e4,
            stage3_prefetch_bucket_size=5e7,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.global_batch_size // per_pass,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, see loop.build_engine
        "steps_per_print": 10**9,  # raylm logs its own metrics
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if ds.offload_optimizer:
        # CPU offload needs DeepSpeed's own CPU Adam; DeepSpeed builds it from this entry.
        s = cfg.schedule
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": s.lr, "betas": list(s.betas), "eps": s.eps, "weight_decay": s.weight_decay},
        }
    return config
