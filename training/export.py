"""Export at the end of training: a consolidated HF model in safetensors (ZeRO-3 parameters gathered) with
the tokenizer, or the PEFT adapter; plus export/manifest.json linking it to the curated data it was
trained on. Both load with `from_pretrained` in a fresh process.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from raylm.core import lineage, outputs, storage
from raylm.core.artifacts import EXPORT_ADAPTER, EXPORT_MODEL, CuratedDir, TrainDir
from raylm.training.config import TrainConfig


def gathered_state_dict(module, rank: int) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 ({} elsewhere). Under ZeRO-3 each parameter is gathered one module
    at a time (a collective on every rank), so peak memory is one module beyond the partition."""
    import deepspeed

    params = list(module.named_parameters())
    if not any(hasattr(p, "ds_id") for _, p in params):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else {}
    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if rank == 0:
                for name, p in sub.named_parameters(recurse=False):
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
        if rank == 0:
            for name, b in sub.named_buffers(recurse=False):
                if name not in sub._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
    return state


def export_model(engine, tokenizer, cfg: TrainConfig, config: dict[str, Any], rank: int) -> str | None:
    """Write <output>/export on rank 0; every rank must call it (the gather is collective)."""
    module = engine.module
    state = gathered_state_dict(module, rank)
    if rank != 0:
        return None
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"export: gathered empty tensors for {empty[:5]}; ZeRO-3 gather failed")
    final = TrainDir(cfg.output).export.root
    kind = EXPORT_ADAPTER if cfg.lora.enabled else EXPORT_MODEL
    with tempfile.TemporaryDirectory(prefix="raylm-export-") as tmp:
        if cfg.lora.enabled:
            # PeftModel.save_pretrained keeps only the adapter weights from the full state dict.
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        else:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        with outputs.staged_output(final, kind) as out:
            storage.copy_tree(tmp, out)
            parents = [CuratedDir(cfg.data_dir).manifest]
            lineage.write_manifest(
                out,
                kind,
                config["train"],
                parents=parents,
                curated=config.get("curated_manifest", {}),
                model={
                    "format": "peft-adapter" if cfg.lora.enabled else "hf-safetensors",
                    "steps": cfg.max_steps,
                    "base_model": cfg.model.path,
                },
            )
    return final
