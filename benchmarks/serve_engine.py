"""Engine-level A/B of the pieces serving/ writes itself instead of using transformers' defaults:

  1. packed prefill (prompts back to back, block-diagonal mask) against left-padded prefill;
  2. decoding with kv_cache.ReservedLayer (append in place) against transformers' DynamicLayer
     (torch.cat of the whole history every step);
  3. the cost of a decode step at output position ~512 against ~32: two batches, one 512 tokens into
     its outputs and one 32 in, stepped alternately; the whole step, and its host-side part (sampling,
     incremental detokenization, bookkeeping: `Engine._advance`) on its own. Plus detokenizing alone:
     the incremental TextStream against decoding the whole sequence on every token (the old way).

Same model as benchmarks/serve.py (random-init Llama, ~27M parameters, fp32; built here with a 1024-token
context for part 3), same 24-word docstring prompts, in one process, the variants alternating rep by rep
(or step by step) so that machine drift hits both alike.

    .venv/bin/python benchmarks/serve_engine.py --out .bench/serve_engine.json     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
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

from serve import llama, save_tokenizer, stdlib_docstrings, throughput_model  # noqa: E402


def as_dynamic_layers(cache) -> None:
    """Swap ReservedLayers back for transformers' own DynamicLayer holding the same tensors."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        plain = DynamicLayer()
        plain.lazy_initialization(layer.keys, layer.values)
        plain.keys, plain.values = layer.keys.contiguous(), layer.values.contiguous()
        cache.layers[i] = plain


def long_context_model(tok_dir: str, out: Path, hidden: int = 512, layers: int = 8) -> str:
    """The throughput model's shape with a 1024-token context, eos never sampled (fixed-length outputs)."""
    import torch

    model, tok = llama(tok_dir, hidden, layers, heads=max(4, hidden // 64), ctx=1024)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id].zero_()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "range": [round(min(values), 3), round(max(values), 3)],
    }


def step_cost_by_position(
    engine, prompts: list[list[int]], near: int, far: int, pairs: int, reps: int
) -> dict:
    """Per-step time at output positions around `near` and around `far`: per rep, one batch is decoded to
    `far` - pairs/2 and a second to `near` - pairs/2, then the two are stepped alternately `pairs` times
    each. Ratios are far/near per adjacent pair of steps."""
    from raylm.serving.engine import SamplingParams

    params = [SamplingParams(far + pairs + 8, 0.0)] * len(prompts)
    tags = list(range(len(prompts)))
    advance, host = engine._advance, []

    def timed_advance(batch, logits):
        start = time.perf_counter()
        out = advance(batch, logits)
        host.append(time.perf_counter() - start)
        return out

    engine._advance = timed_advance
    step_ms: dict[str, list[float]] = {"near": [], "far": []}
    host_ms: dict[str, list[float]] = {"near": [], "far": []}
    last_ids: list[list[int]] = []
    try:
        for rep in range(reps):
            batches = {}
            for name, position in (("far", far), ("near", near)):
                batches[name], _ = engine.prefill(prompts, params, None, tags)
                for _ in range(position - pairs // 2 - 1):
                    engine.step(batches[name])
            for k in range(pairs):
                for name in ("far", "near") if (k + rep) % 2 == 0 else ("near", "far"):
                    start = time.perf_counter()
                    engine.step(batches[name])
                    step_ms[name].append((time.perf_counter() - start) * 1e3)
                    host_ms[name].append(host[-1] * 1e3)
            last_ids = [seq.ids for seq in batches["far"].seqs]
    finally:
        del engine._advance
    return {
        "rows": len(prompts),
        "output_positions_timed": {  # tokens already generated when each timed step starts
            name: [at - pairs // 2, at + pairs // 2 - 1] for name, at in (("near", near), ("far", far))
        },
        "steps_timed_per_position": reps * pairs,
        "step_ms": {k: spread(v) for k, v in step_ms.items()},
        "step_far_over_near": spread([f / n for f, n in zip(step_ms["far"], step_ms["near"])]),
        "host_ms": {k: spread(v) for k, v in host_ms.items()},
        "host_far_over_near": spread([f / n for f, n in zip(host_ms["far"], host_ms["near"])]),
        # the rest of a step is the model's forward pass, whose attention reads the whole KV history
        "forward_ms": {k: spread([s - h for s, h in zip(step_ms[k], host_ms[k])]) for k in step_ms},
        "detokenize_ms_per_step": detokenize_cost(engine, last_ids, (near, far)),
    }


def detokenize_cost(engine, rows: list[list[int]], positions: tuple[int, ...], reps: int = 20) -> dict:
    """Milliseconds to turn one new token per row into text at each output position: TextStream (now)
    against decoding each row's whole sequence (what the engine did before)."""
    from raylm.serving.detokenizer import TextStream

    out: dict[str, dict[str, float]] = {"incremental": {}, "full_decode": {}}
    for n in positions:
        before = []  # each row's stream after n - 1 tokens; every rep times the n-th on a fresh copy
        for ids in rows:
            stream = TextStream(engine._decode)
            for k in range(1, n):
                stream.add(ids[:k])
                stream.take(stream.safe())
            before.append(stream)
        times: dict[str, list[float]] = {"incremental": [], "full_decode": []}
        for rep in range(reps):
            streams = [copy.copy(s) for s in before]
            for kind in ("incremental", "full_decode") if rep % 2 == 0 else ("full_decode", "incremental"):
                start = time.perf_counter()
                for ids, stream in zip(rows, streams):
                    if kind == "full_decode":
                        engine._decode(ids[:n])
                    else:
                        stream.add(ids[:n])
                        stream.take(stream.safe())
                times[kind].append((time.perf_counter() - start) * 1e3)
        for kind, values in times.items():
            out[kind][str(n)] = round(statistics.median(values), 3)
    return out


def prefill_and_cache_ab(engine, prompts: list[list[int]], steps: int, reps: int) -> dict:
    """Parts 1 and 2: packed against left-padded prefill, ReservedLayer against DynamicLayer decoding."""
    from raylm.serving.engine import SamplingParams

    rows = len(prompts)
    params = [SamplingParams(steps + 1, 0.0)] * rows
    tags = list(range(rows))
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
        for _ in range(steps):
            engine.step(batch)
        return (time.perf_counter() - start) / steps

    times: dict[str, list[float]] = {k: [] for k in ("packed", "padded", "reserved", "dynamic")}
    outputs = {}
    for rep in range(reps):
        order = [True, False] if rep % 2 == 0 else [False, True]
        for packed in order:
            times["packed" if packed else "padded"].append(prefill(packed)[0])
        for reserved in order:
            times["reserved" if reserved else "dynamic"].append(decode(reserved))
    for packed in (True, False):  # both prefills must give the same first tokens
        engine.packed_prefill = packed
        _, first = engine.prefill(prompts, params, None, tags)
        outputs[packed] = [d.text for _, d in sorted(first, key=lambda x: x[0])]
    engine.packed_prefill = True

    med = {k: statistics.median(v) for k, v in times.items()}
    lengths = [len(p) for p in prompts]
    return {
        "prompt_tokens": sum(lengths),
        "padded_prompt_tokens": rows * max(lengths),
        "reps": reps,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".bench/serve_engine.json")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=31)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--near", type=int, default=32, help="part 3: the early output position")
    p.add_argument("--far", type=int, default=512, help="part 3: the late output position")
    p.add_argument("--pairs", type=int, default=16, help="part 3: steps timed per position per rep")
    p.add_argument("--position-reps", type=int, default=3)
    p.add_argument("--positions-only", action="store_true", help="run part 3 only")
    args = p.parse_args()

    import torch

    from raylm.serving.engine import Engine

    torch.set_num_threads(os.cpu_count() or 2)
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-engine-"))
    docs = stdlib_docstrings()
    random.Random(0).shuffle(docs)
    tok_dir = save_tokenizer(docs[: int(len(docs) * 0.9)], work / "tokenizer", vocab_size=4096)
    model_dir, n_params = throughput_model(tok_dir, work / "model", hidden=512, layers=8)
    rng = random.Random(1)
    prompts_text = [" ".join(rng.choice(docs).split()[:24]) for _ in range(args.rows)]

    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}, torch {torch.__version__}",
        "model_params": n_params,
        "rows": args.rows,
    }
    if not args.positions_only:
        engine = Engine(model_dir)
        result.update(
            prefill_and_cache_ab(engine, [engine.encode(t) for t in prompts_text], args.steps, args.reps)
        )
        del engine
    engine = Engine(long_context_model(tok_dir, work / "long-model"))
    prompts = [engine.encode(t) for t in prompts_text]
    result["decode_by_output_position"] = step_cost_by_position(
        engine, prompts, args.near, args.far, args.pairs, args.position_reps
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "raw_s"}, indent=2))


if __name__ == "__main__":
    main()
