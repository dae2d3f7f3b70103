"""The `distill` method of `raylm compress`: train a smaller student against the model's logits.

Setup (checked before Ray starts: the student has fewer layers than the teacher and the same vocabulary),
the student's starting weights (a Ray task: the teacher's config with compress.distill.student_layers
layers, initialised from evenly spaced teacher layers or at random; or compress.distill.student as
given), then `raylm train`'s own run on Ray Train: training/run.py's loop_config + fit, with a "distill"
block that makes training/loop.py use training/distill.py's loss, so ZeRO-3, checkpoints, restarts from
them and MLflow step logging are those of the training stage. The export (HF safetensors) becomes the
output's `distill/` folder; `distill_train/` keeps the run's metrics.jsonl and loss curve.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from typing import TYPE_CHECKING, Any

from raylm.compression.config import CompressConfig
from raylm.core import storage
from raylm.core.artifacts import TrainDir
from raylm.core.errors import ConfigError, InputError
from raylm.training.config import TrainConfig

DISTILL = "distill"
WORK = "distill_train"  # the student's training run inside the compress output
STUDENT_INIT = "student_init"  # its starting weights, removed when it is done
if TYPE_CHECKING:
    import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def read_config(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def student_layers(c: CompressConfig, teacher: dict[str, Any]) -> int:
    """The layers of the student: the checkpoint's, compress.distill.student_layers, or half the teacher's."""
    if c.distill.student is not None:
        return int(read_config(c.distill.student)["num_hidden_layers"])
    return c.distill.student_layers or max(1, teacher["num_hidden_layers"] // 2)


def check(c: CompressConfig) -> None:
    """Preflight: a student smaller than the teacher (by layers), with the teacher's vocabulary."""
    teacher = read_config(c.model)
    if "num_hidden_layers" not in teacher:
        raise InputError(f"compress.model {c.model}: config.json has no num_hidden_layers to distill from")
    if c.distill.student is not None:
        if not os.path.isfile(os.path.join(c.distill.student, "config.json")):
            raise InputError(f"compress.distill.student {c.distill.student} is not a local HF model folder")
        vocab = read_config(c.distill.student).get("vocab_size")
        if vocab != teacher.get("vocab_size"):
            raise ConfigError(
                f"compress.distill.student has vocab_size {vocab}, the teacher {teacher.get('vocab_size')}: "
                "distillation compares next-token distributions, so both need the same tokenizer"
            )
    n, total = student_layers(c, teacher), teacher["num_hidden_layers"]
    if n >= total:
        key = "compress.distill.student" if c.distill.student else "compress.distill.student_layers"
        raise ConfigError(f"{key}: the student has {n} layers, not fewer than the teacher's {total}")


def kept_layers(total: int, n: int) -> list[int]:
    """n evenly spaced layer indices of total (every other one at half: 0, 2, 4, ...)."""
    return [i * total // n for i in range(n)]


def build_student(c: CompressConfig, out: str, seed: int) -> str:
    """Write the student's starting model to `out` (a Ray task: loads the teacher); returns `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(c.model)
    keep = kept_layers(config.num_hidden_layers, student_layers(c, config.to_dict()))
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen, Gemma)
        config.layer_types = [config.layer_types[i] for i in keep]
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if c.distill.init == "teacher_layers":
        teacher = AutoModelForCausalLM.from_pretrained(c.model, dtype=torch.float32)
        student.load_state_dict(renumbered(teacher.state_dict(), keep), strict=True)
    with tempfile.TemporaryDirectory(prefix="raylm-student-") as tmp:  # out may be remote
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(c.model).save_pretrained(tmp)
        storage.upload_dir(tmp, out)
    return out


def renumbered(state: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's weights with only the kept layers, numbered 0..len(keep)-1."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, value in state.items():
        match = _LAYER.search(key)
        if match is None:
            out[key] = value
        elif int(match.group(1)) in new_index:
            out[_LAYER.sub(f".layers.{new_index[int(match.group(1))]}.", key, count=1)] = value
    return out


def student_run(
    c: CompressConfig, seed: int, model: str, work: str, tracking: dict[str, str] | None = None
) -> tuple[TrainConfig, dict[str, Any]]:
    """The training stage's config of the student's run (output `work`, starting from the model folder
    `model`) and its loop config with the "distill" block: what Ray Train's workers (or one process,
    training/loop.py's train_in_process) run."""
    from raylm.training.run import check_resume, loop_config, read_curated

    d = c.distill
    t = d.train_config(model, c.data_dir, work, seed, (c.calibration.split, c.eval.split))
    curated = read_curated(c.data_dir, t.train_split, "compress.data_dir")
    resume = check_resume(d.checkpoint.resume_from, t.global_batch_size)
    config = loop_config(t, seed, curated, resume, run_name=DISTILL, tracking=tracking)
    config[DISTILL] = {"teacher": c.model, "temperature": d.temperature, "alpha": d.alpha}
    return t, config


def distill(c: CompressConfig, seed: int, out: str, tracking: dict[str, str] | None) -> dict[str, Any]:
    """Train the student into `out` (the output's distill/ folder) through the training stage's run on
    Ray Train; returns what the manifest records and the seconds it took."""
    import ray

    from raylm.training.run import fit

    started = time.perf_counter()
    d, work = c.distill, storage.join(os.path.dirname(out), WORK)
    model = d.student
    if model is None:
        task = {"num_cpus": c.resources.num_cpus, "num_gpus": c.resources.num_gpus}
        init = storage.join(work, STUDENT_INIT)
        model = ray.get(ray.remote(build_student).options(**task).remote(c, init, seed))
    t, config = student_run(c, seed, model, work, tracking)
    result = fit(t, config)
    fs, path = storage.filesystem(out)
    fs.create_dir(path, recursive=True)  # copy_tree does not make the folder it copies into
    storage.copy_tree(TrainDir(work).export.root, out)
    cleanup(c, work)
    final = {k: (result.metrics or {}).get(k) for k in ("step", "loss", "eval_loss", "eval_perplexity")}
    return {
        "details": {
            "format": "hf-safetensors",
            "teacher_layers": read_config(c.model)["num_hidden_layers"],
            "student_layers": storage.read_json(storage.join(out, "config.json"))["num_hidden_layers"],
            "student": d.student or f"{d.init} of the teacher",
            "temperature": d.temperature,
            "alpha": d.alpha,
            "steps": d.max_steps,
            "final": final,
            "teacher_placement": "a frozen replica per worker (inference mode, not given to DeepSpeed)",
            "training_log": WORK,
        },
        "seconds": time.perf_counter() - started,
    }


def cleanup(c: CompressConfig, work: str) -> None:
    """Drop what only the run needed: the starting weights, the export (now distill/), and the default
    checkpoints (a storage_path the user set is theirs to keep)."""
    run = TrainDir(work)
    doomed = [storage.join(work, STUDENT_INIT), run.export.root]
    if c.distill.checkpoint.storage_path is None:
        doomed.append(run.checkpoints)
    for path in doomed:
        if storage.exists(path):
            storage.remove(path)
