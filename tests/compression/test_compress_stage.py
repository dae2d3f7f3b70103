"""The compress stage end to end on a briefly trained tiny model: every method's folder loads, the
quantized ones within the perplexity bounds of the issue, the pruned ones with exactly the sparsity asked
(2:4 on every pruned Linear), and the manifest links the model and the data."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from raylm.compression.run import run
from raylm.core import lineage, storage
from raylm.core.artifacts import COMPRESS, CompressDir, CuratedDir, ExportDir
from tests.compression.conftest import METHODS

PRUNED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.slow
def test_quantized_models_load_within_bounds(compressed):
    cfg, manifest = compressed
    rows = {r["method"]: r for r in storage.read_json(CompressDir(cfg.compress.output).compare_json)["rows"]}
    assert (
        rows["reference"]["perplexity"] < 100
    )  # trained: far below the 512-token vocabulary (~450 untrained)
    assert rows["gptq_w4a16"]["perplexity_ratio"] <= 1.06
    assert rows["w8a8"]["perplexity_ratio"] <= 1.02
    assert rows["gptq_w4a16"]["bytes"] < rows["w8a8"]["bytes"] < rows["reference"]["bytes"]
    config = storage.read_json(os.path.join(cfg.compress.output, "gptq_w4a16", "config.json"))
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert manifest["methods"]["w8a8"]["smoothed_mappings"] == 4  # 2 norms x 2 layers


@pytest.mark.slow
def test_pruned_models_have_the_sparsity_asked(compressed):
    cfg, _ = compressed
    out = CompressDir(cfg.compress.output)
    for method, sparsity in (("sparse_2of4", 0.5), ("sparse_unstructured", 0.75)):
        weights = load_file(os.path.join(out.method(method).root, "model.safetensors"))
        pruned = {
            k: v for k, v in weights.items() if k.endswith(tuple(f"{n}.weight" for n in PRUNED_LINEARS))
        }
        assert len(pruned) == 14  # 7 Linears x 2 layers
        for name, w in pruned.items():
            assert float((w == 0).float().mean()) == sparsity, name
            if method == "sparse_2of4":
                assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name
        assert not (weights["lm_head.weight"] == 0).any()  # only the decoder layers are pruned


@pytest.mark.slow
def test_manifest_links_model_and_data_and_rerun_skips(compressed):
    cfg, manifest = compressed
    c = cfg.compress
    assert manifest["kind"] == COMPRESS
    assert manifest["parents"] == [ExportDir(c.model).manifest, CuratedDir(c.data_dir).manifest]
    assert set(manifest["methods"]) == set(METHODS)
    assert lineage.read_manifest(c.output)["created_at"] == run(cfg)["created_at"]  # complete: skipped


@pytest.mark.slow
def test_quantized_model_answers_through_the_raylm_engine(compressed):
    """The raylm engine loads the compressed-tensors folder with its own quantization (not random weights
    in place of the packed ones: it once passed quantization_config=None, which drops it) and scores the
    held-out rows as compare.json does."""
    from raylm.compression import calibration
    from raylm.serving.engine import Engine

    cfg, _ = compressed
    c = cfg.compress
    engine = Engine(CompressDir(c.output).method("gptq_w4a16").root)
    rows = {r["method"]: r for r in storage.read_json(CompressDir(c.output).compare_json)["rows"]}
    served = calibration.perplexity(engine.model, calibration.eval_batches(c.data_dir, c.eval))
    assert abs(served / rows["gptq_w4a16"]["perplexity"] - 1) < 1e-3
    ids = engine.tokenizer("the quick brown", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = engine.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


@pytest.mark.slow
def test_mlflow_holds_the_compress_run_with_its_comparison(compressed):
    """Tracked by default like train and tune: one run, the compress section as params, each method's
    perplexity ratio and bytes from the comparison table, compare.json as an artifact."""
    from mlflow import MlflowClient

    from raylm.core import tracking
    from raylm.core.config import dump_config

    cfg, manifest = compressed
    client = MlflowClient(tracking.local_store(cfg.run_dir))
    (mlrun,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["raylm.stage"] == COMPRESS
    assert mlrun.data.params == tracking.flatten(dump_config(cfg.compress))
    for row in manifest["comparison"]:
        assert mlrun.data.metrics[f"{row['method']}.perplexity_ratio"] == pytest.approx(
            row["perplexity_ratio"]
        )
        assert mlrun.data.metrics[f"{row['method']}.bytes"] == row["bytes"]
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id)} == {"manifest.json", "compare.json"}
