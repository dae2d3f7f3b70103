"""The serving half of benchmarks/compress.py: every variant served at once on the engine that serves it,
through `raylm serve`'s own deployment code, then loaded in turns.

Which engine serves which variant, on this CPU machine:
  raylm engine: fp32, bitsandbytes int8 / nf4 (quantized at load), GPTQ W4A16 (transformers' compressed-
                tensors loader: vLLM's CPU build has no float32 W4A16 kernel), the 2:4-pruned model (a
                dense checkpoint with zeros), the distilled student;
  vLLM engine:  W8A8 (vLLM's CPU int8 kernels), beside fp32 on the same engine, so that W8A8's ratio is
                taken against the reference on its own engine.
Every request asks for --max-tokens tokens with ignore_eos, so each variant produces the same tokens per
request whatever its weights say; waves of requests rotate over the variants (benchmarks/serve.py's
interleaved()) so that machine drift hits all alike. Peak memory is each replica's resident high-water
mark (VmHWM) after the load, summed with its child processes' (vLLM's engine core).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import (
    fixed_lengths,
    free_port,
    interleaved,
    kv_bytes_per_token,
    paired,
    summarise,
    wait_http,
    warm_up,
    wave_jobs,
)

BATCH = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}


@dataclass(frozen=True)
class Served:
    name: str  # the benchmark row it measures
    model: str  # folder
    engine: str  # raylm | vllm
    quantization: str = "none"  # the raylm engine's load-time method


def plan(reference: str, folders: dict[str, str]) -> list[Served]:
    """The variants to serve: `folders` maps row names (gptq_w4a16, w8a8, sparsegpt_2of4, distill) to the
    folders compress wrote; the bitsandbytes rows are the reference folder quantized at load."""
    served = [
        Served("reference", reference, "raylm"),
        Served("bnb_int8", reference, "raylm", "int8"),
        Served("bnb_nf4", reference, "raylm", "nf4"),
        Served("reference_on_vllm", reference, "vllm"),
    ]
    engines = {"gptq_w4a16": "raylm", "w8a8": "vllm", "sparsegpt_2of4": "raylm", "distill": "raylm"}
    return served + [Served(name, folders[name], engines[name]) for name in engines if name in folders]


def serve_config(s: Served, port: int, context: int, kv_gib: float):
    from raylm.serving.config import ServeConfig

    extra = {"max_context": context, "vllm": {"kv_cache_gib": kv_gib}} if s.engine == "vllm" else {}
    return ServeConfig(
        engine=s.engine,
        model=s.model,
        app_name=s.name,
        num_cpus=1,
        batching=BATCH,
        quantization={"method": s.quantization},
        http={"port": port, "route_prefix": f"/{s.name}"},
        **extra,
    )


def kv_cache_gib(model_dir: str, sequences: int, context: int) -> float:
    """vLLM's KV cache: room for `sequences` whole contexts in fp32 (a power-of-2 fraction of a GiB here)."""
    return sequences * context * kv_bytes_per_token(model_dir) / 1024**3


def replica_tree(app: str) -> list[int]:
    """Pids of the app's replica processes (Ray titles them ray::ServeReplica:<app>:<deployment>) and of
    everything they started."""
    import psutil

    tag = f"ServeReplica:{app}:"
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if tag in " ".join(proc.info["cmdline"] or []):
            roots.append(proc)
    pids = {p.pid for p in roots}
    for proc in roots:
        pids.update(child.pid for child in proc.children(recursive=True))
    return sorted(pids)


def peak_resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def start_all(served: list[Served], context: int, kv_gib: float) -> dict[str, tuple[str, str]]:
    from raylm.serving.run import start

    port = free_port()
    systems = {}
    for s in served:
        url = start(serve_config(s, port, context, kv_gib), "bench")
        wait_http(url.removesuffix("/v1") + "/health", 600)
        systems[s.name] = (url, "bench")
        print(f"  serving {s.name} ({s.engine}, {s.quantization}) at {url}", flush=True)
    return systems


def measure(served: list[Served], prompts: list[str], max_tokens: int, requests: dict[int, int]) -> dict:
    """Serve every variant, warm each up, load them in rotating waves; per variant: engine, peak memory,
    and throughput at each concurrency (summarise()'s figures)."""
    import ray
    from ray import serve

    ray.init(num_cpus=len(served) + 1, include_dashboard=False, log_to_driver=False)
    try:
        context = min(256, max_tokens + 64)
        kv_gib = kv_cache_gib(served[0].model, BATCH["max_batch_size"], context)
        systems = start_all(served, context, kv_gib)
        extra = {"ignore_eos": True}
        warm_up(systems, prompts, requests, max_tokens, extra)
        raw = interleaved(systems, wave_jobs(prompts, requests, fixed_lengths(requests, max_tokens)), extra)
        return figures(served, raw, requests)
    finally:
        serve.shutdown()
        ray.shutdown()


def same_engine_reference(s: Served) -> str:
    return "reference_on_vllm" if s.engine == "vllm" else "reference"


def figures(served: list[Served], raw: dict, requests: dict[int, int]) -> dict:
    """Per variant: its engine, peak memory (and its ratio to fp32 on the same engine), and at each
    concurrency the pooled throughput plus the wave-by-wave paired ratio to fp32 on the same engine (the
    figure to quote: pairing removes most of the machine's drift)."""
    peaks = {s.name: peak_resident_bytes(replica_tree(s.name)) for s in served}
    out = {}
    for s in served:
        ref = same_engine_reference(s)
        out[s.name] = {
            "engine": s.engine,
            "quantization_at_load": s.quantization,
            "peak_memory_bytes": peaks[s.name],
            "peak_memory_ratio": round(peaks[s.name] / peaks[ref], 3),
            "load": {
                c: {**summarise(c, raw[s.name][c]), "paired_vs_fp32": paired(raw, s.name, ref, c)}
                for c in requests
            },
        }
    return out


def table(served: dict) -> str:
    lines = [
        "variant            engine  peak MiB (ratio)  tok/s c=1 (paired ratio)  tok/s c=32 (paired ratio)"
    ]
    for name, s in served.items():
        cells = []
        for c in sorted(s["load"]):
            f = s["load"][c]
            cells.append(
                f"{f['tokens_per_s']:9.1f} ({f['paired_vs_fp32'].get('throughput_ratio_median', 1):.3f})"
            )
        lines.append(
            f"{name:<18} {s['engine']:<7} {s['peak_memory_bytes'] / 2**20:8.0f} ({s['peak_memory_ratio']:.3f})"
            f"  {cells[0]:>24}  {cells[1]:>25}"
        )
    return "\n".join(lines)


def held_out_prompts(data_dir: str, tokenizer_dir: str, count: int, tokens: int = 32) -> list[str]:
    """`count` prompts: the first `tokens` tokens of held-out rows as text, the rows taken in turn."""
    from transformers import AutoTokenizer

    from raylm.training.data import TokenShards

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = TokenShards.open(data_dir, "eval")[:count]
    texts = [tok.decode(r[:tokens].tolist(), skip_special_tokens=True) for r in rows]
    return [texts[i % len(texts)] for i in range(count)]
