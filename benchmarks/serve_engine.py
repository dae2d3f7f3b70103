"""Engine-level A/B of the two pieces serving/ writes itself instead of using transformers' defaults:

  1. packed prefill (prompts back to back, block-diagonal mask) against left-padded prefill;
  2. decoding with kv_cache.ReservedLayer (append in place) against transformers' DynamicLayer
     (torch.cat of the whole history every step).

Same model as benchmarks/serve.py (random-init Llama, ~27M parameters, fp32), same 24-word docstring
prompts, in one process, the variants alternating rep by rep so that machine drift hits both alike.

    .venv/bin/python benchmarks/serve_engine.py --out .bench/serve_engine.json     # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import save_tokenizer, stdlib_docstrings, throughput_model  # noqa: E402


def as_dynamic_layers(cache) -> None:
    """Swap ReservedLayers back for transformers' own DynamicLayer holding the same tensors."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        plain = DynamicLayer()
        plain.lazy_initialization(layer.keys, layer.values)
        plain.keys, plain.values = layer.keys.contiguous(), layer.values.contiguous()
        cache.layers[i] = plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".bench/serve_engine.json")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=31)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()

    import torch

    from serving.engine import Engine, SamplingParams

    torch.set_num_threads(os.cpu_count() or 2)
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-engine-"))
    docs = stdlib_docstrings()
    random.Random(0).shuffle(docs)
    tok_dir = save_tokenizer(docs[: int(len(docs) * 0.9)], work / "tokenizer", vocab_size=4096)
    model_dir, n_params = throughput_model(tok_dir, work / "model", hidden=512, layers=8)
    rng = random.Random(1)
    prompts_text = [" ".join(rng.choice(docs).split()[:24]) for _ in range(args.rows)]

    engine = Engine(model_dir)
    prompts = [engine.encode(t) for t in prompts_text]
    params = [SamplingParams(args.steps + 1, 0.0)] * args.rows
    tags = list(range(args.rows))
    engine.prefill(prompts, params, None, tags)  # warm-up

    def prefill(packed: bool):
        engine.packed_prefill = packed
        start = time.perf_counter()
        batch, _ = engine.prefill(prompts, params, None, tags)
        return time.perf_counter() - start, batch

    def decode(reserved: bool) -> float:
        _, batch = prefill(packed=True)
        if not reserved:
            as_dynamic_layers(batch.cache)
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step(batch)
        return (time.perf_counter() - start) / args.steps

    times: dict[str, list[float]] = {k: [] for k in ("packed", "padded", "reserved", "dynamic")}
    outputs = {}
    for rep in range(args.reps):
        order = [True, False] if rep % 2 == 0 else [False, True]
        for packed in order:
            times["packed" if packed else "padded"].append(prefill(packed)[0])
        for reserved in order:
            times["reserved" if reserved else "dynamic"].append(decode(reserved))
    for packed in (True, False):  # both prefills must give the same first tokens
        engine.packed_prefill = packed
        _, first = engine.prefill(prompts, params, None, tags)
        outputs[packed] = [d.text for _, d in sorted(first, key=lambda x: x[0])]

    med = {k: statistics.median(v) for k, v in times.items()}
    lengths = [len(p) for p in prompts]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}, torch {torch.__version__}",
        "model_params": n_params,
        "rows": args.rows,
        "prompt_tokens": sum(lengths),
        "padded_prompt_tokens": args.rows * max(lengths),
        "reps": args.reps,
        "prefill_ms": {"packed": round(med["packed"] * 1e3, 1), "padded": round(med["padded"] * 1e3, 1)},
        "prefill_padded_over_packed": round(med["padded"] / med["packed"], 3),
        "decode_step_ms": {
            "reserved": round(med["reserved"] * 1e3, 2),
            "dynamic": round(med["dynamic"] * 1e3, 2),
        },
        "decode_dynamic_over_reserved": round(med["dynamic"] / med["reserved"], 3),
        "same_first_tokens": outputs[True] == outputs[False],
        "raw_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "raw_s"}, indent=2))


if __name__ == "__main__":
    main()
