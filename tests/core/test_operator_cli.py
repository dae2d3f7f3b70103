"""What a user meets first, from a folder outside the checkout: the shipped recipes (`raylm recipes`,
`raylm init`, a recipe by name), `raylm --version`, a quiet end when a pipe's reader stops, and
`raylm check` output that is itself a recipe."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from raylm.core.cli import BROKEN_PIPE_EXIT, main
from raylm.core.config import dump_config, load_config, shipped_recipes

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """The current folder is a fresh one outside the checkout: no ./recipes to fall back on."""
    if not shipped_recipes():
        pytest.fail(
            "raylm.recipes is not importable: reinstall raylm (`make install`) after pyproject.toml changed"
        )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_recipes_lists_every_shipped_recipe_with_its_description(outside, capsys):
    code, out, _ = run_main(capsys, ["recipes"])
    assert code == 0
    listed = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert sorted(listed) == SHIPPED
    assert listed["quickstart"].startswith("Quickstart: runs on a laptop CPU")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_starts_with_a_one_line_description(name):
    first = (ROOT / "recipes" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and first.rstrip().endswith("."), first


def test_init_copies_a_recipe_that_check_accepts_and_never_overwrites(outside, capsys):
    assert run_main(capsys, ["init", "quickstart"])[0] == 0
    copy = outside / "quickstart.yaml"
    assert copy.read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    copy.write_text(copy.read_text().replace("name: quickstart", "name: mine"))
    code, out, _ = run_main(capsys, ["check", "quickstart.yaml"])
    assert code == 0 and "name: mine" in out

    code, _, err = run_main(capsys, ["init", "quickstart"])
    assert code == 2 and "already exists" in err
    assert "name: mine" in copy.read_text(), "the edited copy was overwritten"


def test_init_into_a_folder_or_a_file(outside, capsys):
    (outside / "mine").mkdir()
    assert run_main(capsys, ["init", "pretrain-1b-gpu", "mine"])[0] == 0
    assert run_main(capsys, ["init", "mine/pretrain-1b-gpu.yaml", "other.yaml"])[0] == 0
    assert (outside / "mine" / "pretrain-1b-gpu.yaml").is_file() and (outside / "other.yaml").is_file()


def test_a_shipped_name_resolves_from_any_folder_and_a_missing_one_lists_them(outside, capsys):
    code, out, _ = run_main(capsys, ["check", "quickstart"])
    assert code == 0 and "name: quickstart" in out
    code, _, err = run_main(capsys, ["check", "quickstrat"])
    assert code == 2 and "recipe 'quickstrat' not found" in err and "quickstart" in err.split("raylm:")[-1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"raylm {metadata.version('raylm')}"


@pytest.mark.parametrize(
    "name, overrides", [("quickstart", ["train.max_steps=7", "seed=3"]), ("lora-sweep-gpu", ["seed=3"])]
)
def test_check_output_is_a_recipe_giving_the_same_config(outside, capsys, name, overrides):
    code, out, _ = run_main(capsys, ["check", name, *overrides])
    assert code == 0
    (outside / "resolved.yaml").write_text(out)
    assert yaml.safe_load(out)["seed"] == 3
    assert dump_config(load_config("resolved.yaml")) == dump_config(load_config(name, overrides))


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_a_closed_pipe_ends_quietly(outside, reader):
    """`true` exits before raylm writes, so the write always meets a closed pipe; `head -1` reads the
    first line first (the pipe may or may not be closed by the time the rest is written)."""
    raylm = Path(sys.executable).with_name("raylm")
    proc = subprocess.run(
        ["bash", "-c", f'"{raylm}" check quickstart | {reader}; echo "status=${{PIPESTATUS[0]}}" >&2'],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    statuses = {"true": {BROKEN_PIPE_EXIT}, "head -1": {0, BROKEN_PIPE_EXIT}}[reader]
    assert int(proc.stderr.rsplit("status=", 1)[1]) in statuses, proc.stderr
    if reader == "head -1":
        assert proc.stdout.startswith("# quickstart resolved by `raylm check`"), proc.stdout
