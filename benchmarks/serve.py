"""Serving benchmark: raylm (unbatched vs dynamic batching) against `transformers serve`, plus quantization.

All in one run, on the same model, with the same HTTP client:
  1. throughput (output tokens/s) and p50/p99 latency at concurrency 1, 8, 32 with a fixed output length,
     for raylm with max_batch_size 1, raylm with dynamic batching, and `transformers serve` with and
     without --continuous-batching; ratios are taken against the peer and against unbatched raylm;
  2. quantization quality: a tiny model is trained here on held-in text (Python standard-library
     docstrings, read with `ast`, so nothing is downloaded), then the perplexity of its int8 and nf4
     loads on held-out text is compared with fp32, with each load's memory footprint.

    .venv/bin/python benchmarks/serve.py --out .bench/serve.json        # ~6 min on 2 cores

The throughput model is a random-init Llama (default ~29M parameters, fp32) whose eos logit row is zeroed,
so greedy decoding never stops early and every request produces exactly --max-tokens tokens.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- data and models ----------------------------------------------------------------------------
def stdlib_docstrings(limit_files: int = 400) -> list[str]:
    """Docstrings of the standard library's top-level modules, parsed (not imported): a real corpus
    that every machine has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py"))[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    docs.append(doc)
    return docs


def save_tokenizer(texts: list[str], out: Path, vocab_size: int) -> str:
    from raylm.pipelines.tokenize import train_tokenizer

    tok = train_tokenizer(iter(texts), vocab_size=vocab_size, min_frequency=2)
    tok.save_pretrained(out)
    return str(out)


def llama(tok_dir: str, hidden: int, layers: int, heads: int, ctx: int, seed: int = 0):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,  # bitsandbytes' CPU nf4 kernel needs x64
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=ctx,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg), tok


def throughput_model(tok_dir: str, out: Path, hidden: int, layers: int) -> tuple[str, int]:
    import torch

    model, tok = llama(tok_dir, hidden, layers, heads=max(4, hidden // 64), ctx=512)
    with torch.no_grad():  # eos can never win a greedy argmax: fixed-length outputs on every server
        model.lm_head.weight[tok.eos_token_id].zero_()  # logit 0 < the max of thousands of random logits
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out), sum(p.numel() for p in model.parameters())


def train_tiny(
    tok_dir: str, texts: list[str], out: Path, steps: int, seq: int = 128, batch: int = 16
) -> dict:
    """A small Llama trained briefly on held-in docstrings (plain AdamW loop; training/ is a separate stage)."""
    import torch

    model, tok = llama(tok_dir, hidden=128, layers=2, heads=4, ctx=seq)
    ids = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=steps, pct_start=max(0.1, 2 / steps)
    )
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {
        "path": str(out),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "final_train_loss": statistics.mean(losses[-10:]),
        "train_tokens": int(data.numel()),
    }


# ---- load generation -------------------------------------------------------------------------------
async def load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients, each sending its next request when the previous one is answered."""
    import aiohttp

    queue = list(prompts)
    latencies, tokens, errors = [], [], []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            async with session.post(url + "/completions", json=body) as resp:
                payload = await resp.json(content_type=None)
                if resp.status != 200:
                    errors.append(resp.status)
                    continue
            latencies.append(time.perf_counter() - t0)
            tokens.append(payload["usage"]["completion_tokens"])

    timeout = aiohttp.ClientTimeout(total=900)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "tokens": tokens, "errors": errors, "wall": wall}


def summarise(concurrency: int, runs: list[dict]) -> dict:
    lat = np.array([x for r in runs for x in r["latencies"]]) * 1000
    tokens = [t for r in runs for t in r["tokens"]]
    wall = sum(r["wall"] for r in runs)
    return {
        "concurrency": concurrency,
        "requests": len(tokens),
        "errors": [e for r in runs for e in r["errors"]],
        "wall_s": round(wall, 2),
        "output_tokens": int(sum(tokens)),
        "tokens_per_request": sorted(set(tokens)),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
    }


def interleaved(
    systems: dict[str, tuple[str, str]], prompts: list[str], levels: dict[int, int], max_tokens: int
) -> dict[str, dict[int, list[dict]]]:
    """Every system at every concurrency, one wave of `concurrency` requests at a time, the systems taking
    turns wave by wave (rotating who goes first): a slow spell on this shared machine then hits all of
    them alike instead of whichever happened to be running. Returns each system's waves per level."""
    for url, model in systems.values():  # warm-up, not measured
        asyncio.run(load(url, model, prompts[:2], 1, max_tokens))
    raw: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in systems}
    names = list(systems)
    for conc, n_requests in levels.items():
        for wave in range(max(1, n_requests // conc)):
            batch = prompts[wave * conc : (wave + 1) * conc]
            for name in names[wave % len(names) :] + names[: wave % len(names)]:
                url, model = systems[name]
                raw[name][conc].append(asyncio.run(load(url, model, batch, conc, max_tokens)))
        for name in names:
            print(f"    {name} c={conc}: {summarise(conc, raw[name][conc])}", flush=True)
    return raw


def paired(raw: dict[str, dict[int, list[dict]]], system: str, other: str, conc: int) -> dict:
    """Wave-by-wave comparison of two systems (the waves ran back to back with the same prompts): the median
    of the per-wave throughput ratios and of the per-wave p50 differences. Pairing removes most of the
    machine's drift, which moves absolute figures by 10-20% from minute to minute on a shared VM."""
    ratios, added = [], []
    for mine, theirs in zip(raw[system][conc], raw[other][conc]):
        a, b = summarise(conc, [mine]), summarise(conc, [theirs])
        if a["tokens_per_s"] and b["tokens_per_s"]:
            ratios.append(a["tokens_per_s"] / b["tokens_per_s"])
            added.append(a["p50_ms"] - b["p50_ms"])
    if not ratios:
        return {}
    return {
        "waves": len(ratios),
        "throughput_ratio_median": round(float(np.median(ratios)), 3),
        "throughput_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "p50_added_ms_median": round(float(np.median(added)), 1),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout_s}s")


# ---- the systems under test ------------------------------------------------------------------------
RAYLM_BATCHING = {
    "raylm_unbatched": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
    "raylm_batched": {"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
}
PEER_FLAGS = {
    "transformers_serve": "--no-continuous-batching",
    "transformers_serve_cb": "--continuous-batching",
}


def start_raylm(model_dir: str, cpus: int) -> dict[str, tuple[str, str]]:
    """The raylm variants as Serve applications (each replica gets `cpus` CPUs; only one is busy at a
    time), and `raylm_direct`: the batched LLMServer alone as the HTTP ingress, without the Gateway in
    front (the topology before serving/gateway.py), to price the gateway's extra hop."""
    import ray

    from raylm.serving.config import ServeConfig
    from raylm.serving.run import start

    ray.init(num_cpus=3 * cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    systems = {}
    for name, batching in RAYLM_BATCHING.items():
        cfg = ServeConfig(
            model=model_dir,
            app_name=name,
            num_cpus=cpus,
            batching=batching,
            http={"port": port, "route_prefix": f"/{name}"},
        )
        systems[name] = (start(cfg, "bench"), "bench")
    systems["raylm_direct"] = start_direct(model_dir, cpus, port)
    return systems


def start_direct(model_dir: str, cpus: int, port: int) -> tuple[str, str]:
    from ray import serve

    from raylm.serving.app import LLMServer, deployment_options, init_config
    from raylm.serving.config import ServeConfig

    batching = RAYLM_BATCHING["raylm_batched"]
    cfg = ServeConfig(model=model_dir, app_name="raylm_direct", num_cpus=cpus, batching=batching)
    app = LLMServer.options(**deployment_options(cfg)).bind(init_config(cfg), "bench", [])
    serve.run(app, name="raylm_direct", route_prefix="/raylm_direct", blocking=False)
    wait_http(f"http://127.0.0.1:{port}/raylm_direct/health", 300)
    return f"http://127.0.0.1:{port}/raylm_direct/v1", "bench"


def start_peer(model_dir: str) -> tuple[dict[str, tuple[str, str]], list[subprocess.Popen]]:
    """`transformers serve` with and without continuous batching, each its own process on its own port."""
    systems, procs = {}, []
    for name, flag in PEER_FLAGS.items():
        port = free_port()
        cmd = [
            str(ROOT / ".venv/bin/transformers"),
            "serve",
            model_dir,
            flag,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
        systems[name] = (f"http://127.0.0.1:{port}/v1", model_dir)
    return systems, procs


def run_throughput(
    model_dir: str,
    prompts: list[str],
    levels: dict[int, int],
    max_tokens: int,
    cpus: int,
    with_peer: bool,
) -> tuple[dict, dict]:
    import ray
    from ray import serve

    procs: list[subprocess.Popen] = []
    try:
        systems = start_raylm(model_dir, cpus)
        if with_peer:
            peer, procs = start_peer(model_dir)
            systems.update(peer)
        print(f"  systems: {systems}", flush=True)
        raw = interleaved(systems, prompts, levels, max_tokens)
        results: dict = {
            name: {c: summarise(c, runs) for c, runs in by_level.items()} for name, by_level in raw.items()
        }
        for name in [*RAYLM_BATCHING, "raylm_direct"]:
            stats = serve.get_deployment_handle("LLMServer", app_name=name).stats.remote().result()
            results[name]["batch_sizes"] = stats["batch_sizes"]
            results[name]["packed_prefill"] = stats["packed_prefill"]
        return results, raw
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        serve.shutdown()
        ray.shutdown()


def quantization_quality(model_dir: str, held_out: list[str]) -> dict:
    from raylm.serving.engine import Engine

    out = {}
    for method in ("none", "int8", "nf4"):
        try:
            eng = Engine(model_dir, quantization=method)
            out[method] = {
                "perplexity": round(eng.perplexity(held_out), 4),
                "memory_bytes": eng.memory_footprint(),
            }
            del eng
        except Exception as exc:  # record it and keep the rest of the run
            out[method] = {"error": f"{type(exc).__name__}: {exc}"}
    for method in ("int8", "nf4"):
        if "error" in out[method] or "error" in out["none"]:
            continue
        out[method]["perplexity_ratio_vs_fp32"] = round(
            out[method]["perplexity"] / out["none"]["perplexity"], 4
        )
        out[method]["memory_ratio_vs_fp32"] = round(
            out[method]["memory_bytes"] / out["none"]["memory_bytes"], 4
        )
    return out


def memory_footprints(model_dir: str) -> dict[str, int | str]:
    """Bytes of weights and buffers of each load (fp32, int8, nf4) of a model."""
    from raylm.serving.engine import Engine

    out: dict[str, int | str] = {}
    for method in ("none", "int8", "nf4"):
        try:
            out[method] = Engine(model_dir, quantization=method).memory_footprint()
        except Exception as exc:
            out[method] = f"{type(exc).__name__}: {exc}"
    return out


def ratios(results: dict, raw: dict, levels: dict[int, int]) -> dict:
    """raylm batched against unbatched raylm and against each peer, per concurrency: ratios of the pooled
    figures, and the paired wave-by-wave medians (the ones to quote)."""
    out = {}
    for c in levels:
        b, u = results["raylm_batched"][c], results["raylm_unbatched"][c]
        row = {
            "batched_vs_unbatched_throughput": round(b["tokens_per_s"] / u["tokens_per_s"], 2),
            "batched_minus_unbatched_p50_ms": round(b["p50_ms"] - u["p50_ms"], 1),
            "paired_vs_raylm_unbatched": paired(raw, "raylm_batched", "raylm_unbatched", c),
            "gateway_vs_direct": paired(raw, "raylm_batched", "raylm_direct", c),
        }
        for name in PEER_FLAGS:
            peer = results.get(name, {}).get(c)
            if peer and peer["tokens_per_s"]:
                row[f"throughput_vs_{name}"] = round(b["tokens_per_s"] / peer["tokens_per_s"], 2)
                row[f"p50_vs_{name}"] = round(b["p50_ms"] / peer["p50_ms"], 2)
                row[f"p99_vs_{name}"] = round(b["p99_ms"] / peer["p99_ms"], 2)
                row[f"paired_vs_{name}"] = paired(raw, "raylm_batched", name, c)
        out[c] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".bench/serve.json")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", default="1:40,8:32,32:128", help="concurrency:requests pairs")
    p.add_argument("--train-steps", type=int, default=250)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to the raylm replica")
    p.add_argument("--skip-peer", action="store_true")
    args = p.parse_args()
    levels = {int(c): int(n) for c, n in (pair.split(":") for pair in args.requests.split(","))}
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-serve-"))

    docs = stdlib_docstrings()
    random.Random(0).shuffle(docs)
    cut = int(len(docs) * 0.9)
    held_in, held_out = docs[:cut], docs[cut:]
    tok_dir = save_tokenizer(held_in, work / "tokenizer", vocab_size=4096)
    model_dir, n_params = throughput_model(tok_dir, work / "throughput-model", args.hidden, args.layers)
    print(f"throughput model: {n_params / 1e6:.1f}M parameters", flush=True)
    rng = random.Random(1)
    n_prompts = max(max(c, n) for c, n in levels.items())
    prompts = [" ".join(rng.choice(held_out).split()[:24]) for _ in range(n_prompts)]

    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}",
        "throughput_model": {
            "params": n_params,
            "hidden": args.hidden,
            "layers": args.layers,
            "dtype": "float32",
            "max_tokens": args.max_tokens,
        },
        "levels": levels,
    }
    print("throughput (systems interleaved wave by wave):", flush=True)
    result["throughput"], raw = run_throughput(
        model_dir, prompts, levels, args.max_tokens, args.cpus, not args.skip_peer
    )
    result["ratios"] = ratios(result["throughput"], raw, levels)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))  # again at the end, complete

    print("quantization:", flush=True)
    tiny = train_tiny(tok_dir, held_in, work / "trained-tiny", args.train_steps)
    result["quantization"] = {
        "trained_model": tiny,
        "held_out_docs": len(held_out),
        "results": quantization_quality(tiny["path"], held_out[:200]),
    }
    result["quantization_throughput_model_memory"] = memory_footprints(model_dir)
    result["gpu"] = "not measured: no GPU lent to this task"
    result["wall_s"] = round(time.time() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "ratios": result["ratios"],
                "quantization": result["quantization"]["results"],
                "wall_s": result["wall_s"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
