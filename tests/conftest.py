"""Shared fixtures: one Ray instance per test session, a tokenizer trained here, tiny HF models.

Nothing is downloaded: the tokenizer is trained on generated text and the models are random-init
Llama-shaped networks (2 layers, hidden 64) saved with save_pretrained, so the real from_pretrained
loading code is what the tests exercise.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.synthetic import sample_text

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (4 logical CPUs on 2 cores leaves room for 2 train workers
    plus Ray Data tasks). Token auth stays at Ray's default."""
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on generated text, saved in HF format."""
    from raylm.pipelines.tokenize import train_tokenizer

    rng = random.Random(0)
    texts = [sample_text(rng, 60) for _ in range(400)]
    path = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(iter(texts), vocab_size=512, min_frequency=2)
    tok.save_pretrained(path)
    return str(path)


def build_tiny_llama(tokenizer_dir: str, out_dir, seed: int = 0, **overrides) -> str:
    """Save a random-init 2-layer Llama (hidden 64) with the tokenizer next to it; returns the path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **(shape | overrides),
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory):
    return build_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RAYLM_GPU_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="GPU test: set RAYLM_GPU_TESTS=1 on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
