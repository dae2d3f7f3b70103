"""Knowledge distillation (`compress.methods: [distill]`): a student with half the teacher's layers,
trained by the training loop against the teacher's logits, ends closer to the teacher than the same
student trained on the data alone (alpha 0: no teacher) for the same steps, seed and rows; the stage
(Ray Train, 2 workers, gloo, ZeRO-3) writes a folder that loads with from_pretrained; a student that is
not smaller, or speaks another vocabulary, is refused before Ray starts (exit 2)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from raylm.compression.run import run
from raylm.core import storage
from raylm.core.artifacts import CompressDir, TrainDir
from raylm.core.cli import main
from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from tests.compression.conftest import compress_config, compress_recipe

STEPS = 24
DISTILL = {
    "max_steps": STEPS,
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "schedule": {"lr": 1e-3, "warmup_steps": 2},
    "checkpoint": {"every_steps": STEPS},
}


def _config(trained_model, compress_data, root, **distill):
    return compress_config(
        trained_model, compress_data, root, methods=["distill"], distill={**DISTILL, **distill}
    ).compress


def _kl_after_training(trained_model, compress_data, root, alpha: float) -> float:
    """The student's held-out KL to the teacher after the training loop (one process: world size 1)
    trained it from the teacher's even layers with this alpha."""
    from transformers import AutoModelForCausalLM

    from raylm.compression import calibration
    from raylm.compression.distill import build_student, student_run
    from raylm.training.distill import kl_to_teacher
    from raylm.training.loop import train_in_process

    c = _config(trained_model, compress_data, root, alpha=alpha, num_workers=1)
    start = build_student(c, str(root / "init"), seed=0)
    _, config = student_run(c, 0, start, str(root / "train"))
    train_in_process(config, lambda metrics, checkpoint: None)
    student = AutoModelForCausalLM.from_pretrained(TrainDir(str(root / "train")).export.root)
    teacher = AutoModelForCausalLM.from_pretrained(trained_model)
    return kl_to_teacher(student, teacher, calibration.eval_batches(compress_data, c.eval))


def test_distillation_brings_the_student_closer_to_the_teacher(trained_model, compress_data, tmp_path):
    """Same start, seed, rows and steps; only the loss differs (alpha 0.5, T 2 against alpha 0: the
    cross-entropy alone, the loop loads no teacher at all)."""
    with_teacher = _kl_after_training(trained_model, compress_data, tmp_path / "kd", 0.5)
    alone = _kl_after_training(trained_model, compress_data, tmp_path / "ce", 0.0)
    assert with_teacher < 0.75 * alone, (with_teacher, alone)


@pytest.fixture(scope="module")
def distilled(ray_cluster, trained_model, compress_data, tmp_path_factory):
    """The stage with methods [distill]: Ray Train, 2 workers, gloo, ZeRO-3."""
    cfg = compress_config(
        trained_model, compress_data, tmp_path_factory.mktemp("kd"), methods=["distill"], distill=DISTILL
    )
    return cfg, run(cfg)


@pytest.mark.slow
def test_student_folder_loads_with_half_the_layers(distilled, trained_model):
    from transformers import AutoModelForCausalLM

    cfg, manifest = distilled
    out = CompressDir(cfg.compress.output)
    student = AutoModelForCausalLM.from_pretrained(out.method("distill").root)
    with open(os.path.join(trained_model, "config.json")) as f:
        teacher_layers = json.load(f)["num_hidden_layers"]
    assert student.config.num_hidden_layers == teacher_layers // 2 == 1
    details = manifest["methods"]["distill"]
    assert details["student_layers"] == 1 and details["final"]["step"] == STEPS
    rows = {r["method"]: r for r in manifest["comparison"]}
    assert rows["distill"]["parameters"] < rows["reference"]["parameters"]
    assert rows["distill"]["bytes"] < rows["reference"]["bytes"] and rows["distill"]["kl_to_teacher"] > 0
    # The training stage's run: 2 workers, its per-step history; the default checkpoints are removed.
    work = TrainDir(os.path.join(out.root, "distill_train"))
    with open(work.metrics_jsonl) as f:
        history = [json.loads(line) for line in f]
    assert len(history) == STEPS and history[-1]["world_size"] == 2
    assert not storage.exists(work.checkpoints) and not storage.exists(work.export.root)


def test_loss_is_cross_entropy_plus_zero_kl_against_itself(trained_model, compress_data):
    """The seam on its own: a student identical to its teacher has KL 0, so the loss is (1-alpha) * CE."""
    from transformers import AutoModelForCausalLM

    from raylm.training.data import TokenShards
    from raylm.training.distill import DistillLoss
    from raylm.training.loop import lm_loss

    model = AutoModelForCausalLM.from_pretrained(trained_model)
    x = torch.from_numpy(TokenShards.open(compress_data, "eval")[:4]).long()
    loss_fn = DistillLoss({"teacher": trained_model, "temperature": 2.0, "alpha": 0.25}, torch.device("cpu"))
    assert not any(p.requires_grad for p in loss_fn.teacher.parameters()) and not loss_fn.teacher.training
    loss = loss_fn(model, x)
    loss.backward()  # the teacher's logits (made under inference_mode) do not break autograd
    with torch.no_grad():
        expected = 0.75 * lm_loss(model, x).item()
    assert loss.detach().item() == pytest.approx(expected, rel=1e-5)


def _cli(tmp_path, recipe: dict) -> int:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["compress", str(path)])


def test_a_student_as_deep_as_the_teacher_exits_2(tmp_path, trained_model, compress_data, capsys):
    recipe = compress_recipe(
        trained_model, compress_data, tmp_path / "run", methods=["distill"], distill={"student_layers": 2}
    )
    assert _cli(tmp_path, recipe) == 2
    assert "compress.distill.student_layers" in capsys.readouterr().err


def test_a_student_with_another_vocabulary_exits_2(tmp_path, trained_model, compress_data, capsys):
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "vocab_size": 99}))
    recipe = compress_recipe(
        trained_model, compress_data, tmp_path / "run", methods=["distill"], distill={"student": str(student)}
    )
    assert _cli(tmp_path, recipe) == 2
    assert "same tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"student": "/s", "student_layers": 1}, "at most one of distill.student"),
        ({"temperature": 0}, "compress.distill.temperature"),
        ({"alpha": 1.5}, "compress.distill.alpha"),
        ({"global_batch_size": 6}, "must be a multiple of micro_batch_size"),
    ],
)
def test_bad_distill_sections_fail_at_load(tmp_path, change, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(compress_recipe("/m", "/d", tmp_path, methods=["distill"], distill=change))
    assert fragment in str(err.value) and err.value.exit_code == 2
