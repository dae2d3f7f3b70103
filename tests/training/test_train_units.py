"""Fast checks without Ray: config cross-field rules, the sampler, resume errors, LoRA, the DS config."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.training import checkpoint as ckpt
from raylm.training.config import TrainConfig
from raylm.training.data import GlobalSampler, TokenShards
from raylm.training.deepspeed import ds_config
from raylm.training.run import check_resume, read_curated

SCRATCH = {"from_scratch": {}}


def recipe(**train):
    return {"name": "t", "stages": ["train"], "train": {"model": SCRATCH, **train}}


@pytest.mark.parametrize(
    ("train", "keys"),
    [
        (
            {"global_batch_size": 10, "micro_batch_size": 2, "num_workers": 2},
            ["global_batch_size", "micro_batch_size", "num_workers"],
        ),
        (
            {"lora": {"enabled": True, "quantize_4bit": True}, "model": {"path": "/m"}, "use_gpu": True},
            ["lora.quantize_4bit", "zero_stage 3"],
        ),
        (
            {"deepspeed": {"zero_stage": 2, "offload_params": True}},
            ["deepspeed.offload_params", "zero_stage 3"],
        ),
        ({"deepspeed": {"precision": "fp16"}}, ["deepspeed.precision fp16", "use_gpu"]),
        ({"model": {}}, ["model.path", "model.from_scratch"]),
        ({"deepspeed": {"zero_stage": 4}}, ["train.deepspeed.zero_stage"]),
        ({"bogus": 1}, ["train.bogus: unknown key"]),
    ],
)
def test_bad_combinations_fail_at_load_naming_keys(train, keys):
    with pytest.raises(ConfigError) as err:
        build_config(recipe(**train))
    for key in keys:
        assert key in str(err.value)


def test_cli_exits_2_before_ray(tmp_path, capsys):
    import yaml

    from raylm.core.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(global_batch_size=3)))
    assert main(["train", str(path)]) == 2
    assert "global_batch_size" in capsys.readouterr().err


def test_ds_config_accumulation_absorbs_worker_count():
    t = TrainConfig.model_validate(
        {"model": SCRATCH, "micro_batch_size": 2, "global_batch_size": 8, "num_workers": 2}
    )
    assert ds_config(t)["gradient_accumulation_steps"] == 2
    assert ds_config(t, num_workers=1)["gradient_accumulation_steps"] == 4
    assert ds_config(t)["zero_optimization"]["stage"] == 3
    bf16 = TrainConfig.model_validate({"model": SCRATCH, "deepspeed": {"precision": "bf16", "zero_stage": 2}})
    assert ds_config(bf16)["bf16"] == {"enabled": True}


def test_sampler_covers_each_row_once_per_epoch_on_any_world_size():
    s = GlobalSampler(num_rows=50, global_batch=8, seed=3)
    epoch0 = np.concatenate([s.global_batch_rows(i) for i in range(s.steps_per_epoch)])
    assert len(set(epoch0.tolist())) == 48  # 6 steps x 8, no repeats; 2 rows dropped this epoch
    for step in (0, 5, 6, 13):
        two = np.concatenate([s.rank_rows(step, r, 2) for r in range(2)])
        assert np.array_equal(two, s.rank_rows(step, 0, 1))  # 2 workers read exactly what 1 would
    assert not np.array_equal(s.global_batch_rows(0), s.global_batch_rows(6))  # new epoch, new order
    assert np.array_equal(GlobalSampler(50, 8, 3).global_batch_rows(7), s.global_batch_rows(7))  # seeded
    assert s.position(13) == {"epoch": 2, "offset": 8}


def test_curated_folder_contract(curated_dir, tmp_path):
    manifest = read_curated(curated_dir)
    assert manifest["seq_len"] == 32
    tokens = TokenShards.open(curated_dir, "train")[:]
    assert tokens.shape == (96, 32) and tokens.dtype == np.int32
    with pytest.raises(ConfigError, match="not a complete curated folder"):
        read_curated(str(tmp_path))


def test_resume_from_missing_or_corrupt_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "step_00000004"
    with pytest.raises(ConfigError, match=str(missing)):
        check_resume(str(missing))
    missing.mkdir()
    with pytest.raises(ConfigError, match=f"{missing}.*trainer_state.json is missing"):
        check_resume(str(missing))
    (missing / ckpt.STATE).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{missing}.*corrupt"):
        check_resume(str(missing))
    (missing / ckpt.STATE).write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 3}))
    with pytest.raises(ConfigError, match="no DeepSpeed shards"):
        check_resume(str(missing))
    (missing / "ds").mkdir()
    (missing / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="1 optimizer shards, expected 2"):
        check_resume(str(missing))
    (missing / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    (missing / ckpt.STATE).write_text(
        json.dumps({"step": 4, "world_size": 2, "zero_stage": 3, "global_batch_size": 8})
    )
    assert check_resume(str(missing), 8) == str(missing)
    with pytest.raises(ConfigError, match=r"global_batch_size 8.*is 16"):
        check_resume(str(missing), 16)


def test_lora_trains_only_adapters_and_exports_an_adapter(tiny_model_dir, curated_dir, tmp_path):
    """LoRA on a local HF checkpoint: only adapter weights are trainable and move; the export holds only
    the adapter, and base + adapter reloaded in a fresh model give the trained logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.training.export import export_model
    from raylm.training.model import build_model, param_groups

    cfg = TrainConfig.model_validate(
        {
            "model": {"path": tiny_model_dir},
            "lora": {"enabled": True, "r": 4},
            "output": str(tmp_path / "out"),
            "data_dir": curated_dir,
            "deepspeed": {"zero_stage": 2},
        }
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = build_model(cfg.model, cfg.lora, tok, seq_len=32, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    x = torch.from_numpy(TokenShards.open(curated_dir, "train")[:4]).long()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable and any("lora_B" in n for n in moved)

    class Engine:  # what export_model reads from a DeepSpeed engine (ZeRO <= 2: plain parameters)
        module = model

    out = export_model(Engine(), tok, cfg, {"train": cfg.model_dump(mode="json")}, rank=0)
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-6)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["kind"] == "adapter"


def test_checkpoint_folders_newest_complete_and_keep_last(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):  # 12: a save cut short
        folder = tmp_path / ckpt.step_dir_name(step)
        folder.mkdir()
        if complete:
            (folder / ckpt.STATE).write_text("{}")
    assert ckpt.latest_complete(str(tmp_path)) == str(tmp_path / "step_00000008")
    assert ckpt.latest_complete(str(tmp_path / "missing")) is None and ckpt.latest_complete(None) is None
    ckpt.keep_last(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000008", "step_00000012"]


def test_open_resume_checks_the_batch_and_picks_universal_loading(tmp_path):
    (tmp_path / "ds").mkdir()
    for rank in range(2):
        (tmp_path / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    state = {"step": 4, "world_size": 2, "seed": 0, "zero_stage": 3, "global_batch_size": 8}
    (tmp_path / ckpt.STATE).write_text(json.dumps(state))
    assert not ckpt.open_resume(str(tmp_path), 2, 8).universal
    resume = ckpt.open_resume(str(tmp_path), 1, 8)  # ZeRO-3 shards of 2 ranks on 1: universal
    assert resume.universal and resume.state.step == 4 and resume.state.attempt == 0
    with pytest.raises(ConfigError, match=r"global_batch_size 8; train\.global_batch_size is 16"):
        ckpt.open_resume(str(tmp_path), 2, 16)
    # A checkpoint from before attempt / global_batch_size were saved reads with the current batch.
    old = ckpt.TrainState.from_json({"step": 4, "world_size": 2, "seed": 0}, default_batch=8)
    assert (old.attempt, old.zero_stage, old.global_batch_size, old.history) == (0, 0, 8, [])


def test_reported_metrics_carry_the_latest_eval_and_the_run_name():
    from raylm.training import progress

    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.7, "eval_perplexity": 14.9}]
    history.append({"step": 3, "loss": 2.4, "sample_rows_sha": "ab", "first_step_wall": 1.0, "x": [1]})
    last = progress.latest_eval(history)
    assert last == {"eval_loss": 2.7, "eval_perplexity": 14.9}
    assert progress.latest_eval(history[:1]) == {}
    row = progress.reported_metrics(history[-1], last, "my-run")
    assert row["eval_loss"] == 2.7 and row["run"] == "my-run" and row["loss"] == 2.4 and "x" not in row
    # an evaluation on this very step wins over the carried one
    assert progress.reported_metrics({"step": 4, "eval_loss": 2.6}, last, "r")["eval_loss"] == 2.6


def test_ray_train_report_passes_checkpoints_and_every_nth_step(monkeypatch, tmp_path):
    """Ray Train's report is a barrier that waits for the controller (about a second): the loop calls
    the report function every step, and Ray Train gets every checkpoint plus every `report_every`-th step."""
    import ray.train

    from raylm.training.runtime import ray_train_report

    sent = []
    monkeypatch.setattr(
        ray.train,
        "report",
        lambda m, checkpoint, checkpoint_dir_name: sent.append((m["step"], checkpoint_dir_name)),
    )
    report = ray_train_report(3)
    for step in range(1, 8):
        folder = tmp_path / f"step_{step:08d}" if step == 5 else None
        if folder:
            folder.mkdir()
        report({"step": step, "loss": 1.0}, str(folder) if folder else None)
    assert sent == [(3, None), (5, "step_00000005"), (6, None)]
