"""Every malformed recipe or override ends as `raylm: error: ...` on stderr with exit code 2: no traceback,
a few lines at most, and Ray never imported.

Most cases call core.cli.main in-process (the same code path as the console script, and fast); a few
real processes prove the exit code, the absence of a traceback and that Ray stays unimported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raylm.core.cli import MAX_MESSAGE_LINES, main
from raylm.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "name": "cli",
    "stages": ["curate", "train"],
    "data": {"sources": [{"path": "corpus/"}]},
    "train": {"model": {"from_scratch": {}}},
}
BOMB = (
    "[" + ", ".join(['&a0 ["lol"]', *(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))]) + "]"
)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, str]:
    """Recipe files by name: one good one, and one of each kind of malformed file."""
    folder = tmp_path_factory.mktemp("cli-recipes")
    good = yaml.safe_dump(GOOD)
    files = {
        "good": good.encode(),
        "latin1": (good + "# café\n").encode("latin-1"),
        "utf16": good.encode("utf-16"),
        "binary": bytes(range(256)),
        "alias-bomb": (good + f"extra: {BOMB}\n").encode(),
        "unknown-keys": yaml.safe_dump({**GOOD, **{f"k{i}": i for i in range(1000)}}).encode(),
        "huge": b"name: x\n" + b"#" * (2 << 20),
        "list": b"- name: x\n",
    }
    paths = {}
    for name, data in files.items():
        (folder / f"{name}.yaml").write_bytes(data)
        paths[name] = str(folder / f"{name}.yaml")
    (folder / "a-directory.yaml").mkdir()
    paths["directory"] = str(folder / "a-directory.yaml")
    return paths


def run_main(capsys, argv: list[str]) -> str:
    """main(argv) in-process; asserts the contract of a refused input and returns stderr."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert err.startswith("raylm: error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) <= MAX_MESSAGE_LINES and len(err) < 3200, err[:3000]
    assert out == ""
    return err


FILE_CASES = [
    ("latin1", "not UTF-8"),
    ("utf16", "not UTF-8"),
    ("binary", "not UTF-8"),
    ("alias-bomb", "expands to more than"),
    ("unknown-keys", "... and 995 more"),
    ("huge", "larger than"),
    ("list", "must be a mapping"),
    ("directory", "is a directory"),
]


@pytest.mark.parametrize("name, fragment", FILE_CASES, ids=[n for n, _ in FILE_CASES])
def test_malformed_recipe_file(capsys, recipes, name, fragment):
    assert fragment in run_main(capsys, ["check", recipes[name]])


OVERRIDE_CASES = [
    ("seed=true", "seed: expected a number, not a boolean"),
    ("train.max_steps=false", "train.max_steps"),
    ("train.use_gpu=1", "train.use_gpu"),
    ("train.export=yes-please", "train.export"),
    ("train.schedule.lr=.nan", "train.schedule.lr"),
    ("train.schedule.lr=.inf", "train.schedule.lr"),
    ("train.schedule.lr=-.inf", "train.schedule.lr"),
    ("data.filters.max_digit_fraction=7", "data.filters.max_digit_fraction"),
    ("data.near_dedup.seed=-1", "data.near_dedup.seed"),
    ("train.seed=99999999999", "train.seed"),
    ("ray.num_cpus=-4", "ray.num_cpus"),
    ("data.sources=[{path: ftp://h/corpus}]", "data.sources.0.path: unsupported URI scheme 'ftp://'"),
    ("data.output=http://h/out", "data.output: unsupported URI scheme 'http://'"),
    ("train.data_dir=https://h/curated", "train.data_dir"),
    ("train.checkpoint.storage_path=sftp://h/ck", "train.checkpoint.storage_path"),
    ("train.checkpoint.resume_from=webdav://h/ck", "train.checkpoint.resume_from"),
    ("data.tokenizer.path=hf://gpt2", "data.tokenizer.path"),
    ("run_dir=ftp://h/runs", "run_dir"),
    (f"name={BOMB}", "expands to more than"),
    ("name=" + "x" * 100_000, "characters long"),
    ("name=&a [*a]", "alias contains itself"),
    ("data.sources=" + "[" * 3000 + "]" * 3000, "nested"),
]


@pytest.mark.parametrize("override, fragment", OVERRIDE_CASES, ids=[o[:40] for o, _ in OVERRIDE_CASES])
def test_malformed_override(capsys, recipes, override, fragment):
    assert fragment in run_main(capsys, ["check", recipes["good"], override])


def test_good_recipe_still_checks(capsys, recipes):
    assert main(["check", recipes["good"], "train.schedule.lr=1", "train.use_gpu=false"]) == 0
    assert "lr: 1.0" in capsys.readouterr().out


def test_any_long_error_is_cut_to_a_few_lines(capsys, monkeypatch):
    """Messages raised outside core/config.py (a library's, quoting a whole file) are capped too."""

    def noisy(*_args, **_kwargs):
        raise ConfigError("\n".join(f"line {i} " + "y" * 1000 for i in range(100)))

    monkeypatch.setattr("raylm.core.cli.load_config", noisy)
    err = run_main(capsys, ["check", "whatever"])
    assert "more lines" in err and max(len(line) for line in err.splitlines()) < 400


def _process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, **kwargs
    )


@pytest.mark.parametrize("name", ["latin1", "alias-bomb", "directory"])
def test_console_script_exits_2_without_traceback(recipes, name):
    raylm = Path(sys.executable).with_name("raylm")
    command = [str(raylm)] if raylm.exists() else [sys.executable, "-m", "raylm.core.cli"]
    proc = _process(*command, "check", recipes[name])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("raylm: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= MAX_MESSAGE_LINES


def test_refusals_happen_before_ray_is_imported(recipes):
    """One process runs several refused commands, then reports whether anything imported Ray."""
    argvs = [
        ["curate", recipes["utf16"]],
        ["run", recipes["good"], "seed=true"],
        ["train", recipes["good"], "train.schedule.lr=.nan"],
        ["curate", recipes["good"], "data.sources=[{path: ftp://h/x}]"],
        ["curate", recipes["good"], f"name={BOMB}"],
        ["run", recipes["unknown-keys"]],
    ]
    script = (
        "import json, sys\nfrom core.cli import main\n"
        f"codes = [main(a) for a in {argvs!r}]\n"
        "print(json.dumps({'codes': codes, 'ray': 'ray' in sys.modules}))\n"
    )
    proc = _process(sys.executable, "-c", script)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"codes": [2] * len(argvs), "ray": False}, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("raylm: error: ") == len(argvs)
