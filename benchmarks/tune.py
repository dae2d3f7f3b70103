"""Tuning benchmark: Ray Tune searchers against an exhaustive grid and against standalone Optuna, and the
best LoRA learning rate against the best full fine-tuning one; JSON out (default .bench/tune.json) and a
plot (.bench/tune_regret.png).

    .venv/bin/python benchmarks/tune.py            # the full run (~20 min on 2 cores)
    .venv/bin/python benchmarks/tune.py --quick    # a smoke run (small grid, one seed, few steps)

All in one run, on one Ray instance (2 CPUs):
  * data: corpus A = generated English-looking text (tests/synthetic.py generate_corpus), which trains
    the tokenizer and the base model; corpus B = the standard library's docstrings (the curation source
    builtin:python-docs, pipelines/readers.py), tokenized with A's tokenizer, in the curated folder's
    finetune / finetune_eval splits (split by document);
  * base model: a 2-layer Llama pretrained from scratch on A with raylm's loop (train_in_process);
  * oracle: every point of the LoRA space (lr x rank x target modules, alpha = 2 * rank) trained to
    max_steps through `raylm.tuning.run.run` (grid search, no early stopping);
  * searchers over the same discrete space, each with the same trial budget, at max_concurrent 2, for
    each search seed: TPE + ASHA, random + ASHA, random without early stopping (all Ray Tune), and
    standalone Optuna (TPE + HyperbandPruner, 2 processes sharing a JournalStorage file) running the
    same objective in process. Regret = best final validation loss among a method's completed trials
    minus the oracle's; cost = its training steps / the grid's steps;
  * wall time for the same trials at the same parallelism: the trials of a Ray Tune random sweep without
    early stopping, replayed by standalone Optuna (enqueued, no pruning), at 1 and 2 trials at a time;
  * a grid over the learning rate of full fine-tuning on the same model and data: best full-FT lr
    against the best LoRA lr, and the best LoRA lr per rank.

Training is seeded identically in every trial (trial.seed), so a point trains to the same loss whichever
searcher picks it: the oracle is the exact best of the space, and the script checks that a searcher's
best point reached the oracle's loss for that point.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_SEED = 0
ALPHA_PER_RANK = 2
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",  # one CPU per trial on both sides
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


@dataclass(frozen=True)
class Plan:
    """The sizes of a run (--quick shrinks everything)."""

    lora_lrs: list[float]
    full_lrs: list[float]
    ranks: list[int]
    modules: list[str]
    max_steps: int
    eval_every: int
    samples: int
    seeds: list[int]
    pretrain_steps: int
    corpus_docs: int
    finetune_rows: int
    concurrency: int = 2
    eval_batches: int = 4
    batch: int = 8

    @property
    def grid_size(self) -> int:
        return len(self.lora_lrs) * len(self.ranks) * len(self.modules)

    def space(self) -> dict:
        """The LoRA space as Ray Tune sees it (tune.space)."""
        return {
            "lr": {"choice": self.lora_lrs},
            "rank": {"choice": self.ranks},
            "alpha": {"tied": ALPHA_PER_RANK},
            "target_modules": {"choice": self.modules},
        }

    def choices(self) -> dict[str, list]:
        """The same space as Optuna's categorical parameters."""
        return {"lr": self.lora_lrs, "rank": self.ranks, "target_modules": self.modules}


FULL = Plan(
    lora_lrs=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    full_lrs=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    ranks=[2, 4, 8],
    modules=["attention", "all"],
    max_steps=36,
    eval_every=4,
    samples=12,
    seeds=[0, 1, 2],
    pretrain_steps=300,
    corpus_docs=1500,
    finetune_rows=800,
)
QUICK = Plan(
    lora_lrs=[1e-3, 1e-2, 3e-2],
    full_lrs=[1e-4, 1e-3],
    ranks=[2, 4],
    modules=["attention", "all"],
    max_steps=12,
    eval_every=4,
    samples=4,
    seeds=[0],
    pretrain_steps=40,
    corpus_docs=300,
    finetune_rows=200,
)


# ---- data and the base model ---------------------------------------------------------------------


def corpus_a(docs: int) -> list[str]:
    from tests.synthetic import generate_corpus

    return [d["text"] for d in generate_corpus(docs, seed=0, duplicate_fraction=0.0, max_words=200).docs]


def corpus_b() -> list[str]:
    """The standard library's docstrings (what `builtin:python-docs` curates), shuffled by document."""
    from raylm.pipelines.readers import InputFile, python_docs_files, read_python_docs

    texts = []
    for path in python_docs_files():
        rows = read_python_docs(InputFile(path, "python-docs", 0, None))
        texts += [r["text"] for r in rows if r["reject"] is None and len(r["text"].split()) >= 8]
    random.Random(0).shuffle(texts)
    return texts


def pack(tok, texts: list[str], seq_len: int, rows: int):
    """Documents eos-separated into rows of exactly seq_len tokens (the curated shard layout)."""
    import numpy as np

    ids: list[int] = []
    for text in texts:
        if len(ids) >= rows * seq_len:
            break
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = min(rows, len(ids) // seq_len)
    return np.asarray(ids[: rows * seq_len], dtype=np.int32).reshape(rows, seq_len)


def write_split(curated, split: str, rows, vocab_size: int) -> None:
    from raylm.pipelines.write import write_token_split

    write_token_split(curated.shards, split, rows, vocab_size=vocab_size)


def make_data(work: Path, plan: Plan, seq_len: int) -> tuple[str, dict]:
    """One curated folder: A in train/eval (pretraining), B in finetune/finetune_eval (tuning)."""
    from raylm.core import lineage
    from raylm.core.artifacts import CURATED, CuratedDir
    from raylm.pipelines.tokenize import train_tokenizer

    a, b = corpus_a(plan.corpus_docs), corpus_b()
    tok = train_tokenizer(iter(a), vocab_size=2048)
    curated = CuratedDir(str(work / "curated"))
    tok.save_pretrained(curated.tokenizer)
    Path(curated.shards).mkdir(parents=True)
    held_a, held_b = len(a) // 20, len(b) // 10
    splits = {
        "train": pack(tok, a[held_a:], seq_len, 100_000),
        "eval": pack(tok, a[:held_a], seq_len, 64),
        "finetune": pack(tok, b[held_b:], seq_len, plan.finetune_rows),
        "finetune_eval": pack(tok, b[:held_b], seq_len, plan.eval_batches * plan.batch),
    }
    for split, rows in splits.items():
        write_split(curated, split, rows, len(tok))
    counts = {f"{k}_sequences": len(v) for k, v in splits.items()}
    lineage.write_manifest(curated.root, CURATED, {}, seq_len=seq_len, vocab_size=len(tok), counts=counts)
    words = {"A": sum(len(t.split()) for t in a), "B": sum(len(t.split()) for t in b)}
    tokens_per_word = {
        name: round(
            len(tok(" ".join(texts[:200]))["input_ids"]) / sum(len(t.split()) for t in texts[:200]), 2
        )
        for name, texts in (("A", a), ("B", b))
    }
    info = {"sequences": counts, "words": words, "tokens_per_word": tokens_per_word, "vocab": len(tok)}
    return curated.root, info


def pretrain(data_dir: str, work: Path, plan: Plan) -> tuple[str, dict]:
    """The base model: a 2-layer Llama trained from scratch on A in this process; returns its export."""
    from raylm.core.artifacts import TrainDir
    from raylm.training.config import TrainConfig
    from raylm.training.loop import train_in_process
    from raylm.training.run import loop_config, read_curated

    steps = plan.pretrain_steps
    t = TrainConfig.model_validate(
        {
            "data_dir": data_dir,
            "output": str(work / "pretrain"),
            "num_workers": 1,
            "max_steps": steps,
            "micro_batch_size": 16,
            "global_batch_size": 16,
            "eval_every": steps,
            "eval_batches": 4,
            "log_every": 50,
            "seed": TRAIN_SEED,
            "deepspeed": {"zero_stage": 0},
            "model": {
                "from_scratch": {
                    "hidden_size": 128,
                    "intermediate_size": 256,
                    "num_layers": 2,
                    "num_heads": 4,
                }
            },
            "schedule": {"lr": 3e-3, "warmup_steps": min(20, steps // 4)},
            "checkpoint": {"every_steps": steps},
        }
    )
    config = loop_config(
        t, TRAIN_SEED, read_curated(data_dir), None, backend="in_process", run_name="pretrain"
    )
    t0 = time.time()
    history = train_in_process(config, lambda metrics, checkpoint: None)
    info = {
        "steps": steps,
        "wall_s": round(time.time() - t0, 1),
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "eval_loss_A": history[-1].get("eval_loss"),
        "model": "Llama, 2 layers, hidden 128, MLP 256, 4 heads",
    }
    return TrainDir(t.output).export.root, info


def base_loss_on_b(model: str, data_dir: str) -> float:
    """The base model's loss on B's eval split before any fine-tuning."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.training.data import TokenShards

    rows = TokenShards.open(data_dir, "finetune_eval")[:]
    m = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        x = torch.from_numpy(rows).long()
        return float(m(input_ids=x, labels=x).loss)


# ---- sweeps through raylm.tuning ------------------------------------------------------------------


def recipe(plan: Plan, work: Path, name: str, model: str, data: str, **tune) -> dict:
    """A complete `tune` recipe (as `raylm tune` would load it); tune= overrides its sections."""
    from raylm.core.config import deep_merge

    space = tune.pop("space", plan.space())  # replaced whole: a full fine-tune's space has no LoRA keys
    base = {
        "model": model,
        "data_dir": data,
        "output": str(work / name / "tune"),
        "trial": {
            "train_split": "finetune",
            "eval_split": "finetune_eval",
            "micro_batch_size": plan.batch,
            "global_batch_size": plan.batch,
            "max_steps": plan.max_steps,
            "eval_every": plan.eval_every,
            "eval_batches": plan.eval_batches,
            "log_every": 1000,
            "seed": TRAIN_SEED,
            "schedule": {"warmup_steps": 3},
        },
        "search": {"algorithm": "grid", "max_concurrent": plan.concurrency, "seed": 0},
        "scheduler": {"type": "none", "reduction_factor": 3},
        "resources": {"cpus": 1},
    }
    return {
        "name": name,
        "run_dir": str(work / name),
        "seed": TRAIN_SEED,
        "stages": ["tune"],
        "tune": deep_merge(base, tune) | {"space": space},
    }


def run_sweep(raw: dict) -> dict:
    """One sweep through raylm.tuning.run.run; its trials.csv rows, wall time and summary."""
    from raylm.core.artifacts import TuneDir
    from raylm.core.config import build_config
    from raylm.tuning.run import run

    cfg = build_config(raw)
    t0 = time.time()
    manifest = run(cfg)
    wall = time.time() - t0
    trials_csv = TuneDir(cfg.tune.output).trials_csv
    print(f"  {raw['name']}: {len(read_trials(trials_csv))} trials, {wall:.1f}s", flush=True)
    return {
        "name": raw["name"],
        "wall_s": round(wall, 2),
        # trials.csv is written right after Tuner.fit; what follows is plots and the best adapter copy.
        "until_trials_csv_s": round(os.path.getmtime(trials_csv) - t0, 2),
        "summary": manifest["summary"],
        "trials": read_trials(trials_csv),
    }


def read_trials(path: str) -> list[dict]:
    numeric = {"steps": int, "tokens": int, "wall_s": float, "eval_loss": float, "lr": float}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, kind in numeric.items():
            row[key] = kind(row[key])
        row["rank"] = int(row["rank"]) if row["rank"] else None
    return rows


def point(row: dict) -> tuple:
    return (row["lr"], row.get("rank"), row.get("target_modules") or None)


# ---- standalone Optuna ----------------------------------------------------------------------------


class OptunaReport:
    """The loop's report(metrics, checkpoint_dir): every evaluation goes to trial.report, and the trial
    ends (TrialPruned) where the pruner says so, as ASHA ends a Tune trial."""

    def __init__(self, trial, max_steps: int, eval_every: int):
        self.trial, self.max_steps, self.eval_every = trial, max_steps, eval_every
        self.step, self.loss = 0, math.nan

    def __call__(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import optuna

        self.step = metrics["step"]
        if self.step % self.eval_every and self.step != self.max_steps:
            return
        self.loss = metrics["eval_loss"]
        self.trial.report(self.loss, self.step)
        if self.step < self.max_steps and self.trial.should_prune():
            self.trial.set_user_attr("steps", self.step)
            raise optuna.TrialPruned()


def make_objective(raw: dict, choices: dict[str, list]):
    """Optuna's objective: the Tune trial's training config for the sampled point (tuning/trainable.py's
    trial_train_config on tuning/run.py's trial_base and module_groups), trained in this process."""
    from raylm.core.config import build_config
    from raylm.training.loop import train_in_process
    from raylm.training.run import loop_config, read_curated
    from raylm.tuning.run import module_groups, trial_base
    from raylm.tuning.trainable import TrialSetup, trial_train_config

    cfg = build_config(raw)
    t = cfg.tune
    curated = read_curated(t.data_dir, t.trial.train_split, key="tune.data_dir")
    seq_len = int(curated["seq_len"])
    setup = TrialSetup(trial_base(t), module_groups(t), t.output, cfg.seed, seq_len, curated, cfg.name)

    def objective(trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in choices.items()}
        if "rank" in params:
            params["alpha_per_rank"] = ALPHA_PER_RANK
        trial_id = f"optuna_{trial.number:05d}"
        train = trial_train_config(setup, params, trial_id)
        config = loop_config(train, setup.seed, curated, None, run_name=f"{cfg.name}/{trial_id}")
        report = OptunaReport(trial, train.max_steps, train.eval_every)
        train_in_process(config, report)
        trial.set_user_attr("steps", report.step)
        return report.loss

    return objective


def optuna_worker(spec_path: str) -> int:
    """One standalone Optuna process (`--optuna-worker SPEC`): load the study, optimize, write timings."""
    t_process = float(os.environ["BENCH_T_LAUNCH"])
    spec = json.loads(Path(spec_path).read_text())
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    objective = make_objective(spec["recipe"], spec["choices"])
    pruner = (
        optuna.pruners.HyperbandPruner(
            min_resource=spec["eval_every"], max_resource=spec["max_steps"], reduction_factor=3
        )
        if spec["prune"]
        else optuna.pruners.NopPruner()
    )
    study = optuna.load_study(
        study_name=spec["study"],
        storage=JournalStorage(JournalFileBackend(spec["journal"])),
        sampler=optuna.samplers.TPESampler(seed=spec["sampler_seed"]),
        pruner=pruner,
    )
    t1 = time.time()
    study.optimize(objective, n_trials=spec["n_trials"])
    timings = {"start_s": t0 - t_process, "setup_s": t1 - t0, "optimize_s": time.time() - t1}
    Path(spec["timings"]).write_text(json.dumps(timings))
    return 0


def run_optuna(work: Path, name: str, raw: dict, plan: Plan, **how) -> dict:
    """A standalone Optuna study in `workers` processes sharing a JournalStorage file: TPE (seed) with
    HyperbandPruner (prune), or the `enqueue`d points replayed without pruning."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    workers, n_trials = how["workers"], how["n_trials"]
    folder = work / name
    folder.mkdir(parents=True)
    journal = str(folder / "journal.log")
    storage = JournalStorage(JournalFileBackend(journal))
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    for params in how.get("enqueue", []):
        study.enqueue_trial(params)
    t0 = time.time()
    procs = []
    for i in range(workers):
        spec = {
            "recipe": raw,
            "choices": plan.choices(),
            "study": name,
            "journal": journal,
            # distinct per process, or both processes would propose the same first points
            "sampler_seed": how.get("seed", 0) * 1000 + i,
            "prune": how["prune"],
            "eval_every": plan.eval_every,
            "max_steps": plan.max_steps,
            "n_trials": n_trials // workers + (i < n_trials % workers),
            "timings": str(folder / f"timings-{i}.json"),
        }
        procs.append(start_worker(spec, folder / f"spec-{i}.json"))
    codes = [p.wait() for p in procs]
    wall = time.time() - t0
    if any(codes):
        raise RuntimeError(f"optuna worker failed ({codes}); see {folder}/spec-*.log")
    timings = [json.loads((folder / f"timings-{i}.json").read_text()) for i in range(workers)]
    study = optuna.load_study(study_name=name, storage=storage)
    print(f"  {name}: {len(study.trials)} trials, {wall:.1f}s", flush=True)
    return {"name": name, "wall_s": round(wall, 2), "workers": timings, "trials": optuna_rows(study)}


def start_worker(spec: dict, spec_path: Path) -> subprocess.Popen:
    """`tune.py --optuna-worker SPEC` with one CPU thread, as a Ray trial gets; output to SPEC.log."""
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--optuna-worker", str(spec_path)]
    env = dict(os.environ, **WORKER_ENV, BENCH_T_LAUNCH=str(time.time()))
    with open(spec_path.with_suffix(".log"), "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def last_value(values: dict[int, float]) -> float:
    return values[max(values)] if values else math.nan


def optuna_rows(study) -> list[dict]:
    """trials.csv-like rows of an Optuna study."""
    import optuna

    rows = []
    for tr in study.trials:
        complete = tr.state == optuna.trial.TrialState.COMPLETE
        rows.append(
            {
                "trial_id": f"optuna_{tr.number:05d}",
                "status": "completed" if complete else tr.state.name.lower(),
                "steps": int(tr.user_attrs.get("steps", 0)),
                "eval_loss": tr.value if complete else last_value(tr.intermediate_values),
                "wall_s": (tr.datetime_complete - tr.datetime_start).total_seconds(),
                "lr": tr.params["lr"],
                "rank": tr.params.get("rank"),
                "target_modules": tr.params.get("target_modules"),
            }
        )
    return rows


# ---- the measurements -----------------------------------------------------------------------------

METHODS = {  # name -> tune sections (Ray Tune) or None (standalone Optuna)
    "tpe+asha": {"search": {"algorithm": "tpe"}, "scheduler": {"type": "asha"}},
    "random+asha": {"search": {"algorithm": "random"}, "scheduler": {"type": "asha"}},
    "random": {"search": {"algorithm": "random"}, "scheduler": {"type": "none"}},
    "optuna tpe+hyperband": None,
}


def searches(work: Path, plan: Plan, mk) -> tuple[dict[str, list[dict]], list[dict]]:
    """Every method once per seed, with the same trial budget and parallelism. The Optuna replay of the
    random seed-0 sweep (same trials, 2 at a time) runs right after it, so machine load hits both alike."""
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    replays = []
    for seed in plan.seeds:
        for method, sections in METHODS.items():
            name = f"{method.replace(' ', '-').replace('+', '-')}-s{seed}"
            if sections is None:
                raw = mk(name)
                runs[method].append(
                    run_optuna(
                        work,
                        name,
                        raw,
                        plan,
                        workers=plan.concurrency,
                        n_trials=plan.samples,
                        seed=seed,
                        prune=True,
                    )
                )
                continue
            over = {k: dict(v) for k, v in sections.items()}
            over["search"] |= {"num_samples": plan.samples, "seed": seed}
            runs[method].append(run_sweep(mk(name, **over)))
            if method == "random" and seed == plan.seeds[0]:
                replays.append(replay(work, plan, mk, runs[method][-1], plan.concurrency))
    return runs, replays


def replay(work: Path, plan: Plan, mk, sweep: dict, workers: int) -> dict:
    """Standalone Optuna running the trials a Tune sweep ran (enqueued, no pruning), `workers` at a time."""
    points = [
        {"lr": r["lr"], "rank": r["rank"], "target_modules": r["target_modules"]} for r in sweep["trials"]
    ]
    name = f"optuna-replay-p{workers}"
    raw = mk(name)
    opt = run_optuna(
        work, name, raw, plan, workers=workers, n_trials=len(points), prune=False, enqueue=points
    )
    same = sorted(map(point, sweep["trials"])) == sorted(map(point, opt["trials"]))
    tune_steps, opt_steps = sum(r["steps"] for r in sweep["trials"]), sum(r["steps"] for r in opt["trials"])
    return {
        "parallelism": workers,
        "trials": len(points),
        "same_points": same,
        "steps": {"tune": tune_steps, "optuna": opt_steps},
        "tune_wall_s": sweep["wall_s"],
        "tune_until_trials_csv_s": sweep["until_trials_csv_s"],
        "tune_trial_wall_s": [r["wall_s"] for r in sweep["trials"]],
        "tune_sweep": sweep["name"],
        "optuna_study": opt,
    }


def wall_figures(w: dict) -> dict:
    """Tune against Optuna on the same trials. Until results: launch to the last trial's result stored
    (Tune: run() to trials.csv, which follows Tuner.fit; Optuna: each process's start, imports, study
    setup and optimize, the slowest process). End to end adds Tune's plots and best-adapter copies and
    the Optuna processes' exit."""
    opt = w["optuna_study"]
    opt_until = max(t["start_s"] + t["setup_s"] + t["optimize_s"] for t in opt["workers"])
    opt_trials = [r["wall_s"] for r in opt["trials"]]
    return {
        "parallelism": w["parallelism"],
        "trials": w["trials"],
        "same_points": w["same_points"],
        "steps": w["steps"],
        "until_results_s": {"tune": w["tune_until_trials_csv_s"], "optuna": opt_until},
        "ratio": w["tune_until_trials_csv_s"] / opt_until,
        "end_to_end_s": {"tune": w["tune_wall_s"], "optuna": opt["wall_s"]},
        "ratio_end_to_end": w["tune_wall_s"] / opt["wall_s"],
        "optuna_process_setup_s": [t["start_s"] + t["setup_s"] for t in opt["workers"]],
        "trial_wall_s_median": {
            "tune": statistics.median(w["tune_trial_wall_s"]),
            "optuna": statistics.median(opt_trials),
        },
        "trial_wall_s_sum": {"tune": sum(w["tune_trial_wall_s"]), "optuna": sum(opt_trials)},
    }


def wall_at_one(work: Path, plan: Plan, mk) -> dict:
    """Tune (random, no early stopping, 1 trial at a time) and Optuna replaying its trials in 1 process."""
    over = {
        "search": {"algorithm": "random", "num_samples": plan.samples, "max_concurrent": 1, "seed": 0},
        "scheduler": {"type": "none"},
    }
    sweep = run_sweep(mk("tune-p1", **over))
    return replay(work, plan, mk, sweep, 1) | {"tune": sweep}


def score(run: dict, oracle: dict[tuple, float], grid_steps: int) -> dict:
    """Regret of a method's best completed trial against the oracle, and its share of the grid's steps."""
    best_loss = min(oracle.values())
    spread = max(oracle.values()) - best_loss
    done = [r for r in run["trials"] if r["status"] == "completed" and math.isfinite(r["eval_loss"])]
    best = min(done, key=lambda r: r["eval_loss"])
    regret = best["eval_loss"] - best_loss
    steps = sum(r["steps"] for r in run["trials"])
    return {
        "name": run["name"],
        "best_eval_loss": best["eval_loss"],
        "best_point": point(best),
        "oracle_loss_at_that_point": oracle.get(point(best)),
        "regret": regret,
        "relative_regret": regret / best_loss,
        "normalized_regret": regret / spread if spread else 0.0,
        "steps": steps,
        "grid_fraction": steps / grid_steps,
        "trials": len(run["trials"]),
        "completed": len(done),
        "wall_s": run["wall_s"],
    }


def method_summary(scores: list[dict]) -> dict:
    mean = lambda key: statistics.fmean(s[key] for s in scores)  # noqa: E731
    return {
        "regret_mean": mean("regret"),
        "relative_regret_mean": mean("relative_regret"),
        "relative_regret_max": max(s["relative_regret"] for s in scores),
        "normalized_regret_mean": mean("normalized_regret"),
        "grid_fraction_mean": mean("grid_fraction"),
        "wall_s_mean": mean("wall_s"),
        "per_seed": scores,
    }


def lr_optimum(pairs: list[tuple[float, float]]) -> dict:
    """The grid's best lr, and a parabola through it and its two neighbours in log10(lr): the minimum
    between grid points (the grid's best when it sits at an edge)."""
    pairs = sorted(pairs)
    i = min(range(len(pairs)), key=lambda k: pairs[k][1])
    out = {"grid_best_lr": pairs[i][0], "loss": pairs[i][1], "at_edge": i in (0, len(pairs) - 1)}
    out["interpolated_lr"] = pairs[i][0]
    if not out["at_edge"]:
        (x0, y0), (x1, y1), (x2, y2) = ((math.log10(x), y) for x, y in pairs[i - 1 : i + 2])
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
        if a > 0:
            out["interpolated_lr"] = 10 ** min(max(-b / (2 * a), x0), x2)
    return out


def lr_figures(oracle_rows: list[dict], full_rows: list[dict]) -> dict:
    """Best full-FT lr, best LoRA lr (overall and per rank x module set), their ratio, and how far the
    best LoRA lr moves across ranks."""
    full = lr_optimum([(r["lr"], r["eval_loss"]) for r in full_rows])
    per: dict[str, dict] = {}
    for r in oracle_rows:
        per.setdefault(f"r={r['rank']} {r['target_modules']}", []).append((r["lr"], r["eval_loss"]))
    per = {k: lr_optimum(v) for k, v in sorted(per.items())}
    best_key = min(per, key=lambda k: per[k]["loss"])
    lora = per[best_key]
    moves = {}
    for modules in sorted({r["target_modules"] for r in oracle_rows}):
        lrs = [v["interpolated_lr"] for k, v in per.items() if k.endswith(f" {modules}")]
        grid = [v["grid_best_lr"] for k, v in per.items() if k.endswith(f" {modules}")]
        moves[modules] = {
            "interpolated_max_over_min": max(lrs) / min(lrs),
            "grid_max_over_min": max(grid) / min(grid),
        }
    return {
        "full_ft": full,
        "lora_best": {"config": best_key, **lora},
        "lora_over_full_ratio": {
            "grid": lora["grid_best_lr"] / full["grid_best_lr"],
            "interpolated": lora["interpolated_lr"] / full["interpolated_lr"],
        },
        "lora_best_lr_per_config": per,
        "lora_best_lr_spread_across_ranks": moves,
    }


# ---- output ---------------------------------------------------------------------------------------


def plot_regret(methods: dict[str, dict], path: Path) -> None:
    """Regret against the fraction of the grid's steps: one small marker per seed, a large one per mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, m) in enumerate(methods.items()):
        xs = [s["grid_fraction"] for s in m["per_seed"]]
        ys = [s["regret"] for s in m["per_seed"]]
        ax.scatter(xs, ys, color=f"C{i}", alpha=0.45, s=18)
        ax.scatter(
            [m["grid_fraction_mean"]], [m["regret_mean"]], color=f"C{i}", s=90, marker="D", label=method
        )
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("fraction of the grid's training steps")
    ax.set_ylabel("regret (best validation loss - oracle's)")
    ax.set_title("searchers against the exhaustive grid (diamond: mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(methods: dict[str, dict], walls: list[dict]) -> dict:
    tpe = methods["tpe+asha"]
    randoms = [methods["random+asha"]["regret_mean"], methods["random"]["regret_mean"]]
    return {
        "tpe_asha_within_2pct_of_oracle (mean relative regret <= 0.02)": tpe["relative_regret_mean"] <= 0.02,
        "tpe_asha_at_most_35pct_of_grid_steps": tpe["grid_fraction_mean"] <= 0.35,
        "tpe_asha_lower_regret_than_random (both random variants)": tpe["regret_mean"] < min(randoms),
        **{
            f"tune_wall_at_most_1.3x_optuna (parallelism {w['parallelism']})": w["ratio"] <= 1.3
            for w in walls
        },
    }


def summary_table(result: dict) -> str:
    lines = [
        f"{'method':<22} {'regret':>8} {'rel.':>7} {'norm.':>6} {'steps/grid':>10} {'wall_s':>7}  per-seed regret"
    ]
    for method, m in result["methods"].items():
        seeds = " ".join(f"{s['regret']:.4f}" for s in m["per_seed"])
        lines.append(
            f"{method:<22} {m['regret_mean']:>8.4f} {m['relative_regret_mean']:>7.2%} "
            f"{m['normalized_regret_mean']:>6.3f} {m['grid_fraction_mean']:>10.1%} {m['wall_s_mean']:>7.1f}  {seeds}"
        )
    o = result["oracle"]
    lines.append(
        f"oracle: {o['trials']} trials, best {o['best_eval_loss']:.4f} at {o['best_point']}, {o['wall_s']:.0f}s"
    )
    for w in result["wall"]:
        lines.append(
            f"wall, {w['trials']} trials, {w['parallelism']} at a time, until results: Tune "
            f"{w['until_results_s']['tune']:.1f}s, Optuna {w['until_results_s']['optuna']:.1f}s, ratio "
            f"{w['ratio']:.2f} (end to end {w['ratio_end_to_end']:.2f}); median trial "
            f"{w['trial_wall_s_median']['tune']:.2f}s vs {w['trial_wall_s_median']['optuna']:.2f}s"
        )
    lr = result["learning_rates"]
    lines.append(
        f"best lr: LoRA {lr['lora_best']['interpolated_lr']:.3g} ({lr['lora_best']['config']}, grid "
        f"{lr['lora_best']['grid_best_lr']:.3g}), full FT {lr['full_ft']['interpolated_lr']:.3g} (grid "
        f"{lr['full_ft']['grid_best_lr']:.3g}); ratio {lr['lora_over_full_ratio']['interpolated']:.1f}x "
        f"(grid {lr['lora_over_full_ratio']['grid']:.1f}x)"
    )
    for modules, move in lr["lora_best_lr_spread_across_ranks"].items():
        lines.append(
            f"best LoRA lr across ranks ({modules}): max/min {move['interpolated_max_over_min']:.2f}x"
        )
    lines += [f"target {k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items()]
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------


def measure(work: Path, plan: Plan) -> dict:
    """Every run, raw: data, base model, oracle grid, searchers, wall comparisons, full fine-tuning."""
    import ray

    data, data_info = make_data(work, plan, seq_len=64)
    model, pre = pretrain(data, work, plan)
    pre["base_eval_loss_B"] = base_loss_on_b(model, data)
    print(f"base model: {pre}", flush=True)
    ray.init(
        address="local",
        num_cpus=plan.concurrency,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": WORKER_ENV},
    )

    def mk(name: str, **tune) -> dict:
        return recipe(plan, work, name, model, data, **tune)

    oracle = run_sweep(mk("grid"))
    runs, walls = searches(work, plan, mk)
    walls.insert(0, wall_at_one(work, plan, mk))
    full = run_sweep(
        mk("full-ft", trial={"lora": {"enabled": False}}, space={"lr": {"choice": plan.full_lrs}})
    )
    ray.shutdown()
    return {
        "data": data_info,
        "base_model": pre,
        "oracle": oracle,
        "runs": runs,
        "wall": walls,
        "full_ft": full,
    }


def analyze(raw: dict, plan: Plan) -> dict:
    """The figures: regret and cost per method, the wall ratios, the learning rates, the targets."""
    oracle_rows = raw["oracle"]["trials"]
    oracle = {point(r): r["eval_loss"] for r in oracle_rows}
    grid_steps = plan.grid_size * plan.max_steps
    methods = {m: method_summary([score(r, oracle, grid_steps) for r in rs]) for m, rs in raw["runs"].items()}
    best = min(oracle_rows, key=lambda r: r["eval_loss"])
    result = {
        "data": raw["data"],
        "base_model": raw["base_model"],
        "oracle": {
            "trials": len(oracle_rows),
            "best_eval_loss": best["eval_loss"],
            "worst_eval_loss": max(oracle.values()),
            "best_point": point(best),
            "wall_s": raw["oracle"]["wall_s"],
            "steps": grid_steps,
        },
        "methods": methods,
        "wall": [wall_figures(w) for w in raw["wall"]],
        "learning_rates": lr_figures(oracle_rows, raw["full_ft"]["trials"]),
    }
    result["targets"] = targets(methods, result["wall"])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".bench" / "tune.json"))
    p.add_argument("--quick", action="store_true", help="a smoke run: small grid, one seed, 12 steps")
    p.add_argument("--from-raw", metavar="RAW", help="recompute the figures from a run's raw JSON")
    p.add_argument("--optuna-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.optuna_worker:
        return optuna_worker(args.optuna_worker)
    plan = QUICK if args.quick else FULL
    out = Path(args.out)
    raw_path = out.with_name(out.stem + "_raw.json")
    t0 = time.time()
    if args.from_raw:
        raw = json.loads(Path(args.from_raw).read_text())
    else:
        work = Path(os.environ.get("RAYLM_BENCH_DIR", "/tmp/raylm-bench-tune"))
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        raw = measure(work, plan) | {"total_wall_s": round(time.time() - t0, 1)}
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(raw, indent=1, default=str))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": os.environ.get("RAYLM_MACHINE", "2-core CPU VM, no GPU"),
        "command": "benchmarks/tune.py" + (" --quick" if args.quick else ""),
        "plan": asdict(plan) | {"grid_size": plan.grid_size, "train_seed": TRAIN_SEED, "alpha": "2 * rank"},
        "total_wall_s": raw["total_wall_s"],
        "raw": str(raw_path),
    }
    result |= analyze(raw, plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    plot_regret(result["methods"], out.with_name(out.stem + "_regret.png"))
    print(summary_table(result))
    print(f"total {result['total_wall_s']:.0f}s; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
