"""Build the model to train: an HF causal LM from a local checkpoint or from a config, optionally with
LoRA / QLoRA adapters. No Ray and no torch.distributed here (principle 6): the loop decides placement.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from raylm.training.config import LoraConfig, ModelConfig


def scratch_config(cfg: ModelConfig, tokenizer: Any, seq_len: int):
    from transformers import LlamaConfig

    s = cfg.from_scratch
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads or s.num_heads,
        max_position_embeddings=seq_len,
        rope_theta=s.rope_theta,
        tie_word_embeddings=s.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(
    cfg: ModelConfig,
    lora: LoraConfig,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
):
    """The model to train, on CPU (DeepSpeed moves or partitions it). Seeded so every rank and every
    restart builds the same initial weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if cfg.from_scratch is not None:
        model = AutoModelForCausalLM.from_config(scratch_config(cfg, tokenizer, seq_len), dtype=dtype)
    else:
        kwargs: dict[str, Any] = {
            "torch_dtype": dtype,
            "trust_remote_code": cfg.trust_remote_code,
            "use_safetensors": True,
        }
        if lora.quantize_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
            )
            # bitsandbytes places the 4-bit weights itself; LOCAL_RANK is the device torchrun/Ray assigned.
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{model.get_input_embeddings().num_embeddings}; train with the model's own tokenizer"
        )
    model.config.use_cache = False
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        model = add_lora(model, lora, activation_checkpointing)
    return model


def add_lora(model, lora: LoraConfig, activation_checkpointing: bool):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lora.quantize_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)
    elif activation_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would cut the graph under recomputation
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases / norms (1-D tensors); frozen parameters are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; under ZeRO-3 uses ds_numel (the partitioned tensors are empty)."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def flops_per_token(model_config, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * H * S (Kaplan et al. / PaLM appendix B).

    N counts the weights used in matmuls (attention, MLP, output head; not the embedding lookup),
    6N is forward (2N) plus backward (4N); 12*L*H*S is the attention score and value matmuls. With LoRA
    the frozen weights skip their weight-gradient matmuls, but the convention still counts 6N.
    """
    c = model_config
    h, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = h // c.num_attention_heads
    attn = h * h * 2 + 2 * h * kv * head_dim  # q, o + k, v
    mlp = 3 * h * inter  # gate, up, down
    n = layers * (attn + mlp) + h * c.vocab_size  # + the output head (a matmul per token)
    return 6 * n + 12 * layers * h * seq_len


def cosine_lr_lambda(warmup: int, max_steps: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step `step`: linear warmup, then cosine down to min_ratio."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
