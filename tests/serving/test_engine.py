"""engine.py without Ray: batched generation is exact, sampling controls work, quantized models load."""

from __future__ import annotations

import pytest

from raylm.serving.engine import Engine, SamplingParams, _token_budget_chunks

GREEDY = SamplingParams(max_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapters):
    eng = Engine(tiny_model_dir)
    for name, path in tiny_adapters.items():
        eng.load_adapter(name, path)
    return eng


def run(engine: Engine, prompts: list[str], params: list[SamplingParams], adapter=None) -> list[str]:
    texts = [""] * len(prompts)
    for step in engine.generate([engine.encode(p) for p in prompts], params, adapter):
        for i, delta in enumerate(step):
            if delta is not None:
                texts[i] += delta.text
    return texts


def test_left_padded_batch_equals_one_by_one(engine):
    prompts = ["the", "data train cluster worker token shard", "river mountain"]
    params = [
        GREEDY,
        SamplingParams(max_tokens=3, temperature=0),
        SamplingParams(max_tokens=7, temperature=0),
    ]
    alone = [run(engine, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert run(engine, prompts, params) == alone


def test_rows_finish_on_their_own_length(engine):
    steps = list(
        engine.generate(
            [engine.encode("the city")] * 2,
            [SamplingParams(max_tokens=2, temperature=0), SamplingParams(max_tokens=5, temperature=0)],
        )
    )
    assert len(steps) == 5
    assert steps[1][0].finish_reason == "length" and steps[1][0].completion_tokens == 2
    assert steps[2][0] is None and steps[4][1].completion_tokens == 5


def test_seed_makes_sampling_reproducible(engine):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    assert run(engine, ["the road"], [sp]) == run(engine, ["the road"], [sp])
    others = {run(engine, ["the road"], [SamplingParams(12, 1.0, 0.95, (), s)])[0] for s in range(4)}
    assert len(others) > 1


def test_stop_sequence_cuts_the_text(engine):
    full = run(engine, ["the garden"], [SamplingParams(max_tokens=16, temperature=0)])[0]
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    steps = list(engine.generate([engine.encode("the garden")], [SamplingParams(16, 0, 1.0, (stop,))]))
    text = "".join(s[0].text for s in steps if s[0] is not None)
    assert text == full[: full.index(stop)]
    assert steps[-1][0].finish_reason == "stop"


def test_adapters_change_outputs_and_leave_base_intact(engine):
    base = run(engine, ["the river"], [GREEDY])
    outs = [run(engine, ["the river"], [GREEDY], a)[0] for a in ("lora-a", "lora-b")]
    assert len({base[0], *outs}) == 3
    assert run(engine, ["the river"], [GREEDY]) == base


def test_unknown_adapter_is_refused(engine):
    with pytest.raises(KeyError):
        engine.generate([engine.encode("a")], [GREEDY], "missing")


def test_default_chat_template(engine):
    text = engine.render_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "System: be brief\nUser: hi\nAssistant:"
    assert engine.uses_default_template


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_model_loads_answers_and_is_smaller(tiny_model_dir, engine, method):
    quant = Engine(tiny_model_dir, quantization=method)
    assert quant.memory_footprint() < engine.memory_footprint()
    assert len(run(quant, ["the model"], [GREEDY])[0]) > 0
    texts = ["the model of the data train river mountain garden window letter"] * 8
    # random weights give a near-uniform model, so quantization error must barely move perplexity
    assert quant.perplexity(texts, window=32) == pytest.approx(engine.perplexity(texts, window=32), rel=0.05)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from raylm.core.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        Engine(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="safetensors"):
        Engine(str(tmp_path))


def test_a_checkpoint_missing_weights_is_refused(tiny_model_dir, tmp_path):
    """transformers would fill the missing weight with random values and only log it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from raylm.core.errors import InputError

    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = load_file(copy / "model.safetensors")
    dropped = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, copy / "model.safetensors")
    with pytest.raises(InputError, match=dropped.replace(".", r"\.")):
        Engine(str(copy))


def test_rows_joining_a_running_batch_decode_as_if_alone(engine):
    """Iteration-level batching: a prompt prefilled mid-generation and merged into the running batch
    (KV cache left-padded) produces exactly what it produces alone."""
    a, b = "data train cluster worker token shard", "the"
    alone = {p: run(engine, [p], [GREEDY])[0] for p in (a, b)}
    texts = {a: "", b: ""}
    batch, deltas = engine.prefill([engine.encode(a)], [GREEDY], None, [a])
    for _ in range(3):
        for tag, delta in deltas:
            texts[tag] += delta.text
        deltas = engine.step(batch)
    late, late_deltas = engine.prefill([engine.encode(b)], [GREEDY], None, [b])
    engine.merge(batch, late)
    deltas += late_deltas
    while True:
        for tag, delta in deltas:
            texts[tag] += delta.text
        if not batch.seqs:
            break
        deltas = engine.step(batch)
    assert texts == alone


@pytest.mark.parametrize("packed", [True, False])
def test_packed_and_padded_prefill_match_one_by_one(engine, packed, monkeypatch):
    prompts = ["the", "data train cluster worker token shard", "river mountain", "the city", "a"]
    alone = [run(engine, [p], [GREEDY])[0] for p in prompts]
    monkeypatch.setattr(engine, "packed_prefill", packed)
    assert run(engine, prompts, [GREEDY] * len(prompts)) == alone


def test_prefill_passes_respect_the_token_budget(engine, monkeypatch):
    import raylm.serving.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_PASS_TOKENS", 4)
    prompts = ["the", "data train cluster worker token shard", "river mountain", "the city"]
    alone = [run(engine, [p], [GREEDY])[0] for p in prompts]
    assert run(engine, prompts, [GREEDY] * len(prompts)) == alone
    assert _token_budget_chunks([3, 7, 2, 2, 1], 4) == [[0], [1], [2, 3], [4]]


def test_packed_prefill_is_used_only_where_the_model_honours_its_mask(engine, monkeypatch):
    assert engine.packed_prefill  # Llama with sdpa does
    forward = engine._forward

    def mask_ignored(adapter, **inputs):  # what a model with its own attention code might do
        if inputs.get("attention_mask") is not None and inputs["attention_mask"].dim() == 4:
            inputs["attention_mask"] = None
        return forward(adapter, **inputs)

    monkeypatch.setattr(engine, "_forward", mask_ignored)
    assert not engine._packed_prefill_works()


def test_ignore_eos_generates_to_max_tokens(engine, monkeypatch):
    """The end-of-text token ends a row unless the request asks to ignore it (vLLM's ignore_eos)."""
    first = next(iter(engine.generate([engine.encode("the city")], [SamplingParams(1, 0)])))[0]
    monkeypatch.setattr(engine, "eos_id", engine.encode(first.text)[-1])  # greedy picks it first
    stops = list(engine.generate([engine.encode("the city")], [SamplingParams(6, 0)]))
    goes_on = list(engine.generate([engine.encode("the city")], [SamplingParams(6, 0, ignore_eos=True)]))
    assert stops[-1][0].finish_reason == "stop" and stops[-1][0].completion_tokens == 0
    assert goes_on[-1][0].finish_reason == "length" and goes_on[-1][0].completion_tokens == 6
