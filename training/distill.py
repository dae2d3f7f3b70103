"""Knowledge distillation's loss: the student (the model the loop trains) learns a frozen teacher's
next-token distributions as well as the data's tokens (Hinton et al., 2015).

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy

where _T is the softmax of the logits divided by the temperature T (a higher T shows the student more of
the teacher's ranking of the unlikely tokens); the T^2 keeps the soft term's gradients the same size as
T changes. The KL is averaged over every token position of the micro batch.

The training loop (training/loop.py) uses it as its `loss_fn` when its config has a "distill" block
(compression/distill.py writes one), so ZeRO, checkpoints, recovery and step logging are the loop's own.

The teacher is a plain, frozen replica on every worker: loaded with from_pretrained on the worker's
device, eval(), requires_grad off, its forward under torch.inference_mode, and never given to DeepSpeed.
Under ZeRO-3 it is deliberately not partitioned: a partitioned teacher would be a second DeepSpeed
engine whose every forward all-gathers each layer's weights from the other ranks, on every micro batch,
for weights that never change; a replica costs its weights' bytes once per worker and no communication,
and holds no gradients or optimizer state (a trainable model under ZeRO-3 holds ~16 bytes per parameter
before sharding, a frozen fp32 replica 4). A teacher too large for one worker's memory needs tensor
parallel inference (deepspeed.init_inference, CUDA only), which raylm does not do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from raylm.core import metrics, storage

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_teacher(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen teacher on `device`: eval mode, no parameter requires a gradient."""
    from transformers import AutoModelForCausalLM

    with storage.local_copy(path) as local:  # an s3:// teacher is copied to the worker first
        teacher = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, use_safetensors=True)
    teacher.config.use_cache = False
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over token positions of KL(teacher || student) at `temperature`, times temperature^2."""
    t = temperature
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / t, dim=-1)
    p = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


class DistillLoss:
    """The loop's loss_fn with a teacher: built once per worker from the loop config's "distill" block
    ({"teacher": model folder or URI, "temperature": T, "alpha": weight of the soft term})."""

    def __init__(self, spec: dict[str, Any], device: torch.device, precision: str = "fp32"):
        self.temperature = float(spec["temperature"])
        self.alpha = float(spec["alpha"])
        self.teacher = load_teacher(spec["teacher"], device, DTYPES[precision])
        n, size = teacher_size(self.teacher)
        metrics.log_rank0(
            "distilling from %s (T=%g, alpha=%g): a frozen replica per worker, %s params, %.1f MiB",
            spec["teacher"],
            self.temperature,
            self.alpha,
            f"{n:,}",
            size / 2**20,
        )

    def __call__(self, engine, x: torch.Tensor) -> torch.Tensor:
        out = engine(input_ids=x, labels=x)
        with torch.inference_mode():
            teacher_logits = self.teacher(input_ids=x).logits
        # An inference-mode tensor cannot be saved for backward; a clone made outside it can.
        soft = soft_kl(out.logits, teacher_logits.clone(), self.temperature)
        return self.alpha * soft + (1 - self.alpha) * out.loss


def teacher_size(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model's weights: what the teacher replica adds to each worker."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


@torch.no_grad()
def kl_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean per-token KL(teacher || student) at temperature 1 on held-out batches: how closely the
    student reproduces the teacher's next-token distributions."""
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        s = student(input_ids=ids, use_cache=False).logits
        t = teacher(input_ids=ids, use_cache=False).logits
        total += float(soft_kl(s, t, 1.0)) * ids.numel()
        count += ids.numel()
    return total / count
