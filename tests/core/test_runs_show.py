"""`raylm runs` and `raylm show` on a run made by the stages' own code: a curated folder (token shards
written by pipelines/write.py, a manifest by core/lineage.py with the corpus fingerprint), two steps of
real training in this process (training/loop.py, which exports the model and writes its manifest, then
training/run.py's train manifest), a compress manifest with compression/report.py's comparison, a tune
folder left without a manifest (a killed sweep) and a second run whose curation is still staged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raylm.core import lineage, outputs
from raylm.core.artifacts import COMPRESS, CURATED, TRAIN, TUNE, CompressDir, CuratedDir, RunDir, TrainDir
from raylm.core.cli import main
from raylm.core.config import PlatformConfig, build_config, dump_config

SEQ_LEN = 16


def write_corpus(folder: Path) -> list[tuple[str, int, float]]:
    folder.mkdir()
    for part in range(2):
        lines = [json.dumps({"id": f"d{part}-{i}", "text": f"document {i} of part {part}"}) for i in range(3)]
        (folder / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    return [(str(p), p.stat().st_size, p.stat().st_mtime) for p in sorted(folder.iterdir())]


def write_curated(cfg: PlatformConfig, tokenizer_dir: str, files: list[tuple[str, int, float]]) -> str:
    """A curated folder in the output contract, with the manifest fields curation writes."""
    from transformers import AutoTokenizer

    from raylm.pipelines.write import write_token_split

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    curated = CuratedDir(cfg.data.output)
    rng = np.random.default_rng(0)
    for split, rows in (("train", 8), ("eval", 4)):
        write_token_split(curated.shards, split, rng.integers(0, vocab, (rows, SEQ_LEN)), vocab_size=vocab)
    shutil.copytree(tokenizer_dir, curated.tokenizer)
    counts = {"documents_read": 6, "after_near_dedup": 5, "tokens": 12 * SEQ_LEN}
    inputs = {
        "fingerprint": lineage.fingerprint(files),
        "files": len(files),
        "bytes": sum(f[1] for f in files),
    }
    lineage.write_manifest(
        curated.root,
        CURATED,
        dump_config(cfg.data),
        inputs=inputs,
        counts=counts,
        seq_len=SEQ_LEN,
        vocab_size=vocab,
    )
    return inputs["fingerprint"]


def train_two_steps(cfg: PlatformConfig) -> None:
    """training/run.py's run() without Ray Train: the same loop in this process, then its manifest."""
    from ray.train import Result

    from raylm.training.loop import train_in_process
    from raylm.training.run import loop_config, read_curated, write_train_manifest

    t = cfg.train
    outputs.claim_run_dir(cfg.run_dir, t.output)
    outputs.claim(t.output, TRAIN)
    storage_dir = TrainDir(t.output).checkpoints
    config = loop_config(t, 0, read_curated(t.data_dir), None, backend="in_process", storage_dir=storage_dir)
    reports: list[dict] = []
    train_in_process(config, lambda metrics, _checkpoint: reports.append(metrics))
    result = Result(metrics=reports[-1], checkpoint=None, error=None, path=storage_dir)
    write_train_manifest(t, 0, result, [CuratedDir(t.data_dir).manifest])


def write_compress(run: RunDir, curated: str, export: str) -> None:
    from raylm.compression.report import comparison

    out = CompressDir.under(run)
    os.makedirs(out.method("gptq_w4a16").root)
    rows = comparison(
        {"method": "reference", "parameters": 100, "bytes": 400, "perplexity": 50.0},
        [{"method": "gptq_w4a16", "parameters": 100, "bytes": 200, "perplexity": 51.0}],
    )
    methods = {"gptq_w4a16": {"path": "gptq_w4a16", "weight_bits": 4}}
    parents = [os.path.join(export, "manifest.json"), os.path.join(curated, "manifest.json")]
    lineage.write_manifest(
        out.root, COMPRESS, {"methods": ["gptq_w4a16"]}, parents, methods=methods, comparison=rows
    )


@pytest.fixture(scope="module")
def runs_root(tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs-show")
    files = write_corpus(root / "corpus")
    train = {
        "model": {
            "from_scratch": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2}
        },
        "num_workers": 1,
        "micro_batch_size": 2,
        "global_batch_size": 2,
        "max_steps": 2,
        "eval_every": 2,
        "eval_batches": 1,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2},
    }
    data = {"sources": [{"path": str(root / "corpus")}], "seq_len": SEQ_LEN}
    run_dir = root / "runs" / "demo"
    cfg = build_config({"name": "demo", "run_dir": str(run_dir), "seed": 0, "data": data, "train": train})
    fingerprint = write_curated(cfg, tiny_tokenizer_dir, files)
    train_two_steps(cfg)
    run = RunDir(str(run_dir))
    write_compress(run, run.curated.root, run.train.export.root)
    outputs.claim(run.tune.root, TUNE)  # a sweep killed before its manifest
    outputs.claim(str(root / "runs" / "crashed" / "curated.partial-0badc0de"), CURATED)  # still staging
    (root / "runs" / "notes").mkdir()  # not a run: listed nowhere
    return root / "runs", fingerprint


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # the module's run trains for two steps (about 15 s, once)
def test_show_on_an_export_lists_curate_and_train(runs_root, capsys):
    runs, fingerprint = runs_root
    run = RunDir(str(runs / "demo"))
    code, out, err = run_main(capsys, ["show", run.train.export.root])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"model  {run.train.export.root}  (created 20")
    assert f"  made by train {run.train.root} (" in out and "step 2, loss " in out
    assert "  config:" in out and "    max_steps: 2" in out  # the train section that made it
    curated = next(i for i, line in enumerate(lines) if line.startswith(f"  <- curated  {run.curated.root}"))
    assert f"fingerprint {fingerprint}, files 2" in "\n".join(lines[curated:])
    assert "    sources:" in "\n".join(lines[curated:]) and "seq_len: 16" in "\n".join(lines[curated:])


@pytest.mark.slow  # the module's run trains for two steps (about 15 s, once)
def test_show_a_compress_method_and_a_run_from_another_folder(runs_root, tmp_path):
    """The installed console script, run where there is no checkout: a compress method folder (its
    manifest is its parent's) traces back through the model to the curated data; a run folder shows
    its newest complete stage output."""
    runs, _ = runs_root
    run = RunDir(str(runs / "demo"))
    raylm = Path(sys.executable).with_name("raylm")
    method = CompressDir.under(run).method("gptq_w4a16").root
    proc = subprocess.run([raylm, "show", method], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"compress  {CompressDir.under(run).root}  (created")
    assert f"{method} is gptq_w4a16 of this compress output: weight_bits 4" in proc.stdout
    assert f"  <- model  {run.train.export.root}" in proc.stdout
    assert f"\n     <- curated  {run.curated.root}" in proc.stdout  # the model's parent, one level deeper
    assert f"  <- curated  {run.curated.root}  (shown above)" in proc.stdout
    proc = subprocess.run(
        [raylm, "show", run.root], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"the latest stage output of run {run.root}: compress" in proc.stdout


@pytest.mark.slow  # the module's run trains for two steps (about 15 s, once)
def test_runs_lists_stages_status_and_figures(runs_root, capsys):
    runs, _ = runs_root
    code, out, err = run_main(capsys, ["runs", str(runs)])
    assert code == 0, err
    blocks = {block.split()[0]: block for block in out.strip().split("\n\n")}
    assert sorted(blocks) == ["crashed", "demo"]
    demo = {line.split()[0]: line.split(None, 3)[1:] for line in blocks["demo"].splitlines()[1:]}
    assert list(demo) == ["curate", "train", "tune", "compress"]  # stage order; serve never ran
    assert demo["curate"][0] == "complete" and demo["curate"][2].startswith(
        "6 documents in, 5 kept, 192 tokens"
    )
    assert demo["train"][0] == "complete" and demo["train"][2].startswith("step 2, loss ")
    assert demo["tune"][0] == "incomplete" and len(demo["tune"]) == 2  # no manifest, no figures
    assert demo["compress"] == ["complete", demo["compress"][1], "gptq_w4a16 perplexity x1.0200 size x0.500"]
    assert blocks["crashed"].splitlines()[1].split()[:2] == ["curate", "started"]
    # The same listing through a storage URI; a run folder lists itself.
    code, uri_out, _ = run_main(capsys, ["runs", f"file://{runs}"])
    assert code == 0 and uri_out == out.replace(f"  {runs}/", f"  file://{runs}/")
    code, one, _ = run_main(capsys, ["runs", str(runs / "demo")])
    assert code == 0 and one == blocks["demo"] + "\n"


def test_missing_or_empty_folders_exit_2_naming_them(tmp_path, capsys):
    empty, notes, tune = tmp_path / "empty", tmp_path / "notes", RunDir(str(tmp_path / "run")).tune.root
    empty.mkdir()
    notes.mkdir()
    outputs.claim(tune, TUNE)  # a sweep killed before its manifest
    cases = [
        (["runs", str(tmp_path / "nope")], f"runs folder {tmp_path / 'nope'} does not exist"),
        (["runs", str(empty)], f"no runs under {empty}"),
        (["show", str(tmp_path / "nope")], f"{tmp_path / 'nope'} does not exist"),
        (["show", str(notes)], f"{notes} has no manifest.json"),
        (["show", tune], f"{tune} has no manifest.json"),
        (["show", str(tmp_path / "run")], f"run folder {tmp_path / 'run'} has no complete stage output yet"),
    ]
    for argv, message in cases:
        code, out, err = run_main(capsys, argv)
        assert (code, out) == (2, ""), (argv, code, out)
        assert message in err and "Traceback" not in err, (argv, err)


def test_a_manifest_that_cannot_be_read_is_named_not_a_traceback(tmp_path, capsys):
    curated = tmp_path / "run" / "curated"
    curated.mkdir(parents=True)
    (curated / "manifest.json").write_text('{"kind": "curated", "counts": ')  # cut off mid-write by hand
    code, out, _ = run_main(capsys, ["runs", str(tmp_path)])
    assert code == 0 and out.splitlines()[1].split()[:2] == ["curate", "unreadable"]
    code, out, err = run_main(capsys, ["show", str(curated)])
    assert (code, out) == (2, "") and f"{curated}/manifest.json cannot be read as a manifest" in err
