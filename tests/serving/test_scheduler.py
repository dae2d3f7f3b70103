"""scheduler.py without Ray: AsyncEngine batches requests between decoding steps and gives each exactly
what it gets alone, keeps at most max_batch_size rows together, never unloads an adapter in use, and lets
a closed stream's rows leave the batch."""

from __future__ import annotations

import asyncio

import pytest

from raylm.serving.engine import Engine, SamplingParams
from raylm.serving.scheduler import AsyncEngine, GenerationRequest

GREEDY = SamplingParams(max_tokens=10, temperature=0)
PROMPTS = ["the", "data train cluster worker token shard", "river mountain", "the city", "a garden"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Engine(tiny_model_dir)


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's greedy text generated on its own, with the plain engine."""
    return {(p, None): model.complete(p, GREEDY) for p in PROMPTS}


def request(model, prompt: str, adapter=None, n: int = 1, params=GREEDY) -> GenerationRequest:
    return GenerationRequest(adapter or "base", adapter, [model.encode(prompt)] * n, [params] * n)


async def collect(engine: AsyncEngine, req: GenerationRequest, delay: float = 0) -> list[str]:
    await asyncio.sleep(delay)
    texts = [""] * len(req.prompts)
    async for i, delta in engine.generate(req):
        texts[i] += delta.text
    return texts


def test_requests_arriving_mid_generation_decode_as_if_alone(model, alone):
    long = SamplingParams(max_tokens=40, temperature=0)

    async def main():
        engine = AsyncEngine(model, "base", max_batch_size=4, batch_wait_timeout_s=0.01)
        first = await engine.submit(request(model, PROMPTS[1], params=long))
        text = (await anext(first))[1].text  # its batch is decoding now; the others join it
        late = asyncio.gather(*(collect(engine, request(model, p)) for p in PROMPTS * 2))
        async for _, delta in first:
            text += delta.text
        return engine, text, await late

    engine, text, texts = asyncio.run(main())
    assert text == model.complete(PROMPTS[1], long)
    assert [t[0] for t in texts] == [alone[(p, None)] for p in PROMPTS * 2]
    sizes = engine.stats()["batch_sizes"]
    assert max(sizes) == 4 and sizes[4] >= 5, sizes  # the first request's row plus three joiners


def test_batch_wait_gathers_a_batch_and_n_splits_across_batches(model, alone):
    async def main():
        engine = AsyncEngine(model, "base", max_batch_size=3, batch_wait_timeout_s=0.5)
        # 7 sequences of one request: more than max_batch_size, so admitted in slices of 3
        texts = await collect(engine, request(model, "the city", n=7))
        return engine, texts

    engine, texts = asyncio.run(main())
    assert texts == [alone[("the city", None)]] * 7
    assert max(engine.stats()["batch_sizes"]) == 3


def test_reconfigure_changes_the_batch_bound(model):
    async def main():
        engine = AsyncEngine(model, "base", max_batch_size=8, batch_wait_timeout_s=0.2)
        engine.reconfigure(2, 0.0)
        await asyncio.gather(*(collect(engine, request(model, p)) for p in PROMPTS))
        return engine

    engine = asyncio.run(main())
    assert engine.stats()["max_batch_size"] == 2 and engine.stats()["batch_wait_timeout_s"] == 0.0
    assert max(engine.stats()["batch_sizes"]) <= 2


def test_adapters_in_use_stay_loaded_and_the_lru_shrinks_back(tiny_model_dir, tiny_adapters):
    model = Engine(tiny_model_dir)
    expected = {}
    for name, path in tiny_adapters.items():
        model.load_adapter(name, path)
        expected[name] = model.complete("the river", GREEDY, name)
        model.unload_adapter(name)
    expected[None] = model.complete("the river", GREEDY)

    async def main():
        engine = AsyncEngine(model, "base", tiny_adapters, max_loaded=1, max_batch_size=8)
        names = [None, "lora-a", "lora-b", "lora-a", None, "lora-b"]
        texts = await asyncio.gather(*(collect(engine, request(model, "the river", a)) for a in names))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(engine.executor, lambda: None)  # unloads ran
        return names, texts, engine

    names, texts, engine = asyncio.run(main())
    assert [t[0] for t in texts] == [expected[a] for a in names]  # no row ran on a wrong adapter
    assert len(engine.adapters.loaded) == 1 and not +engine.adapters.users
    assert model.adapters == list(engine.adapters.loaded)


def test_a_closed_stream_leaves_the_batch(model, alone):
    long = SamplingParams(max_tokens=60, temperature=0)

    async def main():
        engine = AsyncEngine(model, "base", max_batch_size=8, batch_wait_timeout_s=0.01)
        quitter = await engine.submit(request(model, "the city", n=3, params=long))
        other = asyncio.create_task(collect(engine, request(model, "the")))
        async for _ in quitter:
            break  # the client went away after its first delta
        await quitter.aclose()
        text = await other
        return engine, text

    engine, text = asyncio.run(main())
    assert text == [alone[("the", None)]]
    # 4 rows decoded together at first, then only "the" once the three closed rows left
    sizes = engine.stats()["batch_sizes"]
    assert sizes.get(1, 0) >= 5 and not engine._running and not engine._queue


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(model, alone, monkeypatch):
    calls = {"n": 0}
    step = model.step

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return step(batch)

    monkeypatch.setattr(model, "step", flaky)

    async def main():
        engine = AsyncEngine(model, "base", max_batch_size=8, batch_wait_timeout_s=0.0)
        with pytest.raises(RuntimeError, match="boom"):
            await collect(engine, request(model, "the"))
        return await collect(engine, request(model, "the"))

    assert asyncio.run(main()) == [alone[("the", None)]]
