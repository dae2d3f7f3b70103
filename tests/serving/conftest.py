"""Fixtures for the serving tests: LoRA adapters with non-zero weights, a free loopback port."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    """A TCP port free on loopback right now (other engineers share this machine: never assume 8000)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_adapter(model_dir: str, out_dir, seed: int) -> str:
    """A LoRA adapter on q/v projections with random (non-zero) A and B, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: build_adapter(tiny_model_dir, root / name, seed)
        for seed, name in enumerate(["lora-a", "lora-b"])
    }


@pytest.fixture(scope="session")
def head32_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """The tiny Llama with 2 heads of 32 (the session's has 4 of 16): vLLM's CPU attention kernels take
    head sizes from 32 up, and the engine tests run the same model on both engines."""
    from tests.conftest import build_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama-h32")
    return build_tiny_llama(tiny_tokenizer_dir, out, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="session")
def head32_adapters(head32_model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters-h32")
    return {
        name: build_adapter(head32_model_dir, root / name, seed)
        for seed, name in enumerate(["lora-a", "lora-b"])
    }


@pytest.fixture(scope="module")
def loopback_port() -> int:
    return free_port()
