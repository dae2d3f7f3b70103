"""The OpenAI API end to end: a real Serve deployment on the session's Ray, driven by the `openai` package,
once per serving engine (raylm's own, and vLLM through Ray Serve LLM), on the same model.

Per engine, `main` (base + two LoRA adapters, API key required) is deployed once. The raylm engine also
deploys `tight` (a queue bound of one, to see 503 + Retry-After; the Gateway answers it the same for both
engines) and `nf4` (the base model quantized at load by bitsandbytes, a raylm engine method).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from raylm.serving.config import ServeConfig
from raylm.serving.http import hash_key
from raylm.serving.run import start

pytestmark = pytest.mark.slow
KEY = "test-key-123"
BASE = "tiny"


# The vLLM engine on CPU: a small KV cache (its default claims most of the node's memory) and no
# compilation (start-up in seconds, not minutes).
VLLM_CPU = {"engine": "vllm", "vllm": {"kv_cache_gib": 0.25, "enforce_eager": True}}


@pytest.fixture(scope="module", params=["raylm", "vllm"])
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(engine, ray_cluster, head32_model_dir, head32_adapters, loopback_port):
    from ray import serve

    port = loopback_port
    main = ServeConfig(
        model=head32_model_dir,
        adapters={"paths": head32_adapters, "max_loaded": 2},
        app_name="main",
        http={"port": port, "route_prefix": "/"},
        batching={"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
        default_max_tokens=20,
        niceness=0,
        **(VLLM_CPU if engine == "vllm" else {}),
    )
    if engine == "vllm":
        yield {"main": start(main, BASE, [hash_key(KEY)]), "port": port, "main_cfg": main, "engine": engine}
        serve.shutdown()
        return
    tight = ServeConfig(
        model=head32_model_dir,
        app_name="tight",
        http={"port": port, "route_prefix": "/tight"},
        max_ongoing_requests=1,
        max_queued_requests=1,
        retry_after_s=2,
        batching={"max_batch_size": 1},
    )
    nf4 = ServeConfig(
        model=head32_model_dir,
        app_name="nf4",
        http={"port": port, "route_prefix": "/nf4"},
        quantization={"method": "nf4"},
    )
    urls = {"main": start(main, BASE, [hash_key(KEY)]), "tight": start(tight, BASE), "nf4": start(nf4, BASE)}
    yield {**urls, "port": port, "main_cfg": main, "engine": engine}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["main"], api_key=KEY, max_retries=0, timeout=120)


def post(url: str, body, key: str | None = KEY, raw: bytes | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return requests.post(
            url, data=raw, headers={**headers, "Content-Type": "application/json"}, timeout=120
        )
    return requests.post(url, json=body, headers=headers, timeout=120)


def greedy(client, model: str, prompt: str, max_tokens: int = 12) -> str:
    return (
        client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        .choices[0]
        .text
    )


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [BASE, "lora-a", "lora-b"]
    health = requests.get(server["main"].removesuffix("/v1") + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_counts_tokens(client, head32_model_dir):
    from transformers import AutoTokenizer

    prompt = "the model of the river"
    out = client.completions.create(model=BASE, prompt=prompt, max_tokens=7, temperature=0)
    n_prompt = len(
        AutoTokenizer.from_pretrained(head32_model_dir)(prompt, add_special_tokens=False)["input_ids"]
    )
    assert out.usage.prompt_tokens == n_prompt
    choice = out.choices[0]
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == n_prompt + out.usage.completion_tokens
    assert choice.text and out.model == BASE


def test_max_tokens_is_a_default_and_a_bound(client):
    """No max_tokens: serve.default_max_tokens (20 here); max_tokens above it is honoured, not capped."""
    outs = {
        asked: client.completions.create(model=BASE, prompt="the long road", temperature=0, **kw)
        for asked, kw in ((20, {}), (40, {"max_tokens": 40}))
    }
    ran_out = [asked for asked, out in outs.items() if out.choices[0].finish_reason == "length"]
    assert ran_out, "both stopped early: pick a prompt the tiny model does not end"
    for asked in ran_out:
        assert outs[asked].usage.completion_tokens == asked


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the city"}],
        max_tokens=6,
        temperature=0,
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens > 5 and 1 <= out.usage.completion_tokens <= 6


def test_streaming_equals_non_streaming(server, client):
    prompt, kw = "data train cluster", {"max_tokens": 10, "temperature": 0}
    whole = client.completions.create(model=BASE, prompt=prompt, **kw).choices[0].text
    chunks = list(
        client.completions.create(
            model=BASE, prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    chat = list(
        client.chat.completions.create(
            model="lora-a", messages=[{"role": "user", "content": "hi"}], stream=True, **kw
        )
    )
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason in ("stop", "length")
    # the wire format: server-sent events ending with data: [DONE]
    raw = requests.post(
        server["main"] + "/completions",
        json={"model": BASE, "prompt": prompt, "stream": True, **kw},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    events = [line for line in raw.text.splitlines() if line.startswith("data:")]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert events[-1].strip() == "data: [DONE]" and len(events) >= 3


def test_seed_n_and_stop(client):
    kw = {
        "model": BASE,
        "prompt": "the morning",
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 7,
    }
    first, again = client.completions.create(n=3, **kw), client.completions.create(n=3, **kw)
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # each choice samples with its own seed
    text = greedy(client, BASE, "the winter", 12)
    stop = next(text[i : i + 2] for i in range(1, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stopped = client.completions.create(
        model=BASE, prompt="the winter", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_adapters_and_base_give_different_outputs(client):
    prompt = "the river and the mountain"
    outs = {m: greedy(client, m, prompt) for m in (BASE, "lora-a", "lora-b")}
    assert len(set(outs.values())) == 3, outs
    assert greedy(client, BASE, prompt) == outs[BASE]  # adapters left nothing behind on the base


def test_concurrent_mixed_models_match_sequential_and_batch(server, client):
    from ray import serve

    handle = (
        serve.get_deployment_handle("LLMServer", app_name="main") if server["engine"] == "raylm" else None
    )
    before = handle.stats.remote().result()["batch_sizes"] if handle else {}
    jobs = [
        (m, f"the {w} of the {w}")
        for w in ("city", "road", "stone", "garden")
        for m in (BASE, "lora-a", "lora-b")
    ]
    expected = {job: greedy(client, *job) for job in jobs}
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = dict(zip(jobs, pool.map(lambda job: greedy(client, *job), jobs)))
    assert got == expected  # wrong adapter in a shared batch, or bad padding, would change greedy outputs
    if handle is None:
        return  # vLLM's batches are its own (its metrics show them)
    after = handle.stats.remote().result()["batch_sizes"]
    grew = {int(k): after[k] - before.get(k, 0) for k in after}
    assert any(size > 1 and count > 0 for size, count in grew.items()), grew


@pytest.mark.parametrize(
    ("body", "raw", "key", "status", "param"),
    [
        (None, b"{not json", KEY, 400, None),
        (None, b"[1, 2]", KEY, 400, None),
        ({"model": BASE}, None, KEY, 400, "prompt"),
        ({"model": BASE, "prompt": "a", "temperature": 3}, None, KEY, 400, "temperature"),
        ({"model": BASE, "prompt": "a", "top_p": 0}, None, KEY, 400, "top_p"),
        ({"model": BASE, "prompt": "a", "max_tokens": 0}, None, KEY, 400, "max_tokens"),
        ({"model": BASE, "prompt": "a", "n": 50}, None, KEY, 400, "n"),
        ({"model": BASE, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, None, KEY, 400, "stop"),
        ({"model": BASE, "prompt": "a", "max_tokens": "many"}, None, KEY, 400, "max_tokens"),
        ({"model": BASE, "prompt": "a", "logprobs": 3}, None, KEY, 400, "logprobs"),
        ({"model": BASE, "prompt": "the " * 300}, None, KEY, 400, "prompt"),
        ({"model": BASE, "prompt": "the", "max_tokens": 500}, None, KEY, 400, "max_tokens"),
        ({"model": "no-such-model", "prompt": "a"}, None, KEY, 404, "model"),
        ({"model": BASE, "prompt": "a"}, None, None, 401, None),
        ({"model": BASE, "prompt": "a"}, None, "wrong", 401, None),
    ],
)
def test_completion_errors(server, body, raw, key, status, param):
    resp = post(server["main"] + "/completions", body, key=key, raw=raw)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in resp.text
    assert err["param"] == param
    if status == 400 and body and "max_tokens" in body and body["max_tokens"] == 500:
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": BASE, "messages": []}, 400),
        ({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ({"model": BASE, "messages": "hello"}, 400),
        ({"model": "lora-z", "messages": [{"role": "user", "content": "x"}]}, 404),
    ],
)
def test_chat_errors(server, body, status):
    resp = post(server["main"] + "/chat/completions", body)
    assert resp.status_code == status and resp.json()["error"]["message"]


def test_unknown_route_is_openai_404(server):
    resp = requests.get(server["main"] + "/engines", timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="a", max_tokens=2, temperature=9)


def test_load_of_concurrent_clients_all_answered(client):
    def one(i: int) -> int:
        model = (BASE, "lora-a", "lora-b")[i % 3]
        out = client.completions.create(
            model=model, prompt=f"the {i} token", max_tokens=8, temperature=0.7, seed=i
        )
        return out.usage.completion_tokens

    with ThreadPoolExecutor(24) as pool:
        tokens = list(pool.map(one, range(72)))
    assert len(tokens) == 72 and all(t >= 1 for t in tokens)


def test_excess_load_gets_503_with_retry_after(server):
    if server["engine"] != "raylm":
        pytest.skip("the Gateway's 503 is the same for both engines: measured once, on the raylm engine")
    url = server["tight"] + "/completions"

    def one(_: int) -> requests.Response:
        return post(url, {"model": BASE, "prompt": "the city", "max_tokens": 40, "temperature": 0}, key=None)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "2" for r in refused)
    assert all(r.json()["error"]["code"] == "service_unavailable" for r in refused)  # OpenAI body, not text


def test_nf4_model_answers(server):
    if server["engine"] != "raylm":
        pytest.skip(
            "nf4 is the raylm engine's bitsandbytes method (the vLLM engine refuses it: test_vllm_engine)"
        )
    import openai

    client = openai.OpenAI(base_url=server["nf4"], api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(model=BASE, prompt="the village", max_tokens=5, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens >= 1
    from ray import serve

    stats = serve.get_deployment_handle("LLMServer", app_name="nf4").stats.remote().result()
    main = serve.get_deployment_handle("LLMServer", app_name="main").stats.remote().result()
    assert stats["memory_bytes"] < main["memory_bytes"]
    json.dumps(stats)


def test_niceness_reaches_the_replica_process(server):
    """Ray starts workers at nice 15; serve.niceness (0 on `main`) sets the replica's, `tight` keeps Ray's."""
    import os

    from ray import serve

    if server["engine"] != "raylm":
        pytest.skip(
            "the replica's pid is in the raylm engine's stats (the vLLM engine gets the same runtime_env)"
        )
    nice = {}
    for app in ("main", "tight"):
        pid = serve.get_deployment_handle("LLMServer", app_name=app).stats.remote().result()["pid"]
        nice[app] = os.getpriority(os.PRIO_PROCESS, pid)
    assert nice == {"main": 0, "tight": 15}
