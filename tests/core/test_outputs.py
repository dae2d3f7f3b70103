"""raylm never removes or overwrites what it did not write (core/outputs.py)."""

import json
import os

import pytest

from raylm.core import outputs, storage
from raylm.core.errors import ConfigError
from raylm.core.lineage import write_manifest


def user_folder(path, files=("a.jsonl", "notes.txt")):
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text(f"user data in {name}\n")
    return path


def snapshot(path):
    return {p: open(p, "rb").read() for p in map(str, path.rglob("*")) if os.path.isfile(p)}


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda p: user_folder(p), "raylm did not write"),
        (lambda p: user_folder(p, files=(".hidden",)), "raylm did not write"),
        (lambda p: user_folder(p / "sub", files=("x",)).parent, "raylm did not write"),
        (lambda p: (p.parent.mkdir(exist_ok=True), p.write_text("a file")), "existing file"),
        (lambda p: (p.mkdir(), (p / storage.MANIFEST).write_text('{"kind": "curated"}')), "did not write"),
        (lambda p: (p.mkdir(), (p / outputs.MARKER).write_text("not json")), "did not write"),
        (lambda p: outputs.claim(str(p), "train"), "'train' output, not a 'curated'"),
        (lambda p: (p.mkdir(), write_manifest(str(p), "model", {})), "'model' output, not a 'curated'"),
    ],
    ids=[
        "user-files",
        "hidden-file",
        "user-subfolder",
        "a-file",
        "foreign-manifest",
        "bad-marker",
        "other-kind-marker",
        "other-kind-manifest",
    ],
)
def test_output_that_raylm_did_not_write_is_refused(tmp_path, prepare, message):
    out = tmp_path / "out"
    prepare(out)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        outputs.check_output("data.output", str(out), "curated")
    assert str(err.value).startswith("data.output: "), "the message names the key"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "prepare",
    [
        lambda p: None,
        lambda p: p.mkdir(),
        lambda p: outputs.claim(str(p), "curated"),
        lambda p: (p.mkdir(), write_manifest(str(p), "curated", {})),  # made before markers existed
    ],
    ids=["absent", "empty", "marked", "legacy-manifest"],
)
def test_absent_empty_or_own_output_is_accepted(tmp_path, prepare):
    out = tmp_path / "out"
    prepare(out)
    outputs.check_output("data.output", str(out), "curated")


@pytest.mark.parametrize(
    "output, source",
    [
        ("corpus/curated", "corpus"),  # output inside the input
        ("corpus", "corpus/part-0.jsonl"),  # input inside the output
        ("corpus", "corpus/*.jsonl"),  # a glob under the output
        ("corpus/out", "corpus/*.jsonl"),  # output under a glob's folder
        ("link/out", "corpus"),  # through a symbolic link to the input
    ],
)
def test_output_overlapping_an_input_is_refused(tmp_path, output, source):
    user_folder(tmp_path / "corpus", files=("part-0.jsonl",))
    (tmp_path / "link").symlink_to(tmp_path / "corpus")
    with pytest.raises(ConfigError, match="lies inside"):
        outputs.check_output(
            "data.output", str(tmp_path / output), "curated", {"data.sources[0].path": str(tmp_path / source)}
        )


def test_staged_output_replaces_only_raylm_folders(tmp_path):
    final = tmp_path / "out"
    with outputs.staged_output(str(final), "curated") as tmp:
        storage.write_text(f"{tmp}/data.txt", "first")
    assert json.loads((final / outputs.MARKER).read_text())["kind"] == "curated"
    with outputs.staged_output(str(final), "curated") as tmp:  # its own output: replaced
        storage.write_text(f"{tmp}/data.txt", "second")
    assert (final / "data.txt").read_text() == "second"

    # Someone puts their files there while the stage runs: the new output is dropped, theirs stay.
    other = tmp_path / "other"
    with (
        pytest.raises(ConfigError, match="did not write"),
        outputs.staged_output(str(other), "curated") as tmp,
    ):
        storage.write_text(f"{tmp}/data.txt", "ours")
        user_folder(other)
    assert sorted(os.listdir(other)) == ["a.jsonl", "notes.txt"]
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p], "the staging folder is cleaned up"


def test_run_dir_with_foreign_files_is_refused_and_legacy_runs_accepted(tmp_path):
    run_dir = user_folder(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"run_dir: .*did not write"):
        outputs.check_stage_output("data.output", str(run_dir / "curated"), "curated", str(run_dir))
    # An output elsewhere does not care what run_dir holds.
    outputs.check_stage_output("data.output", str(tmp_path / "elsewhere"), "curated", str(run_dir))

    legacy = tmp_path / "legacy"
    (legacy / "curated").mkdir(parents=True)
    write_manifest(str(legacy / "curated"), "curated", {})
    (legacy / "train.partial-1234abcd").mkdir()
    outputs.check_stage_output("train.output", str(legacy / "train"), "train", str(legacy))
    outputs.claim_run_dir(str(legacy), str(legacy / "train"))
    user_folder(legacy / "stray", files=("x.txt",))
    outputs.check_stage_output("train.output", str(legacy / "train"), "train", str(legacy))  # now claimed


def test_publish_incomplete_keeps_what_the_user_must_read(tmp_path):
    staging = tmp_path / "out.partial-1"
    (staging / "rejects").mkdir(parents=True)
    (staging / "rejects" / "part.parquet").write_text("rows")
    final = outputs.publish_incomplete(str(staging), str(tmp_path / "out"), "curated", ["rejects", "absent"])
    assert (tmp_path / "out" / "rejects" / "part.parquet").read_text() == "rows"
    assert outputs.output_kind(final) == "curated" and not storage.is_complete(final)
    outputs.check_output("data.output", final, "curated")  # a rerun may replace it
