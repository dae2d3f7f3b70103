"""Every stage refuses, before Ray starts, an output that would overwrite what raylm did not write."""

import pytest

from raylm.core.cli import main
from raylm.core.outputs import claim


def recipe(tmp_path, stage: str) -> str:
    sections = {
        "train": f"train:\n  model: {{from_scratch: {{}}}}\n  data_dir: {tmp_path}/curated\n",
        "serve": f"serve:\n  model: {tmp_path}/model\n",
    }
    path = tmp_path / "r.yaml"
    path.write_text(f"name: g\nrun_dir: {tmp_path}/run\nstages: [{stage}]\n{sections[stage]}")
    return str(path)


def user_files(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "keep-me.txt").write_text("user data")


CASES = {
    "train-output-holds-user-files": ("train", lambda t: user_files(t / "out"), ["train.output={t}/out"]),
    "train-output-is-a-file": ("train", lambda t: (t / "f").write_text("x"), ["train.output={t}/f"]),
    "train-output-is-the-data": (
        "train",
        lambda t: claim(str(t / "curated"), "curated"),
        ["train.output={t}/curated"],
    ),
    "train-output-inside-the-data": ("train", lambda t: None, ["train.output={t}/curated/out"]),
    "train-output-inside-the-model": (
        "train",
        lambda t: user_files(t / "base"),
        ["train.model.path={t}/base", "train.model.from_scratch=null", "train.output={t}/base/out"],
    ),
    "train-output-of-another-kind": (
        "train",
        lambda t: claim(str(t / "o"), "curated"),
        ["train.output={t}/o"],
    ),
    "train-run-dir-holds-user-files": ("train", lambda t: user_files(t / "run"), []),
    "serve-run-dir-holds-user-files": ("serve", lambda t: user_files(t / "run"), []),
    "serve-folder-holds-user-files": ("serve", lambda t: user_files(t / "run" / "serve"), []),
}


@pytest.mark.parametrize("case", CASES)
def test_stage_output_over_user_files_exits_2_and_changes_nothing(tmp_path, capsys, case):
    stage, prepare, overrides = CASES[case]
    prepare(tmp_path)
    before = {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code = main([stage, recipe(tmp_path, stage), *(o.format(t=tmp_path) for o in overrides)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("raylm: error: ") and len(err.splitlines()) <= 3, err
    assert "train.output" in err or "run_dir" in err, "the message names the key"
    after = {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != "r.yaml"}
    assert after == {k: v for k, v in before.items() if not k.endswith("r.yaml")}
