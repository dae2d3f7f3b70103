"""The wheel installs raylm under its own namespace: `import raylm.training`, never a top-level `core` or
`training` that would collide with another distribution's modules."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "raylm.core",
    "raylm.pipelines",
    "raylm.pipelines.dedup",
    "raylm.training",
    "raylm.serving",
    "raylm.tuning",
    "raylm.cluster",
    "raylm.recipes",
]
GENERIC_NAMES = {"core", "pipelines", "training", "serving", "tuning", "cluster", "benchmarks", "tests"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """A new virtual environment holding only the built wheel; its dependencies (torch, Ray, ...) come
    from the development environment through a path entry, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tracked files, so the checkout gets no build/ folder (whose stale files a
    # later build would pack) and untracked files cannot leak into the wheel.
    source = tmp / "source"
    tracked = subprocess.check_output(["git", "ls-files", "-z"], cwd=ROOT, text=True).split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, source],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp.glob("raylm-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)  # ensurepip's bundled pip: no network
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True, timeout=300
    )
    # Dependencies only: a plain path entry does not run the development environment's .pth files, so
    # its editable raylm stays invisible here.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir, site


def test_no_generic_top_level_modules_in_site_packages(fresh_env):
    _, site = fresh_env
    top_level = {p.name.removesuffix(".py") for p in site.iterdir()}
    assert "raylm" in top_level
    assert not top_level & GENERIC_NAMES, sorted(top_level & GENERIC_NAMES)


def test_every_package_imports_from_the_wheel(fresh_env, tmp_path):
    env_dir, site = fresh_env
    code = "; ".join(f"import {p}" for p in PACKAGES) + "; print(raylm.core.__file__)"
    out = subprocess.run(
        [env_dir / "bin" / "python", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site)), "imported from the wheel, not the checkout"


def installed_raylm(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The wheel's console script, run as a user would: from a folder outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [env_dir / "bin" / "raylm", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def test_console_script_checks_a_shipped_recipe_from_any_folder(fresh_env, tmp_path):
    env_dir, site = fresh_env
    assert (site / "raylm" / "recipes" / "quickstart.yaml").is_file(), "the recipes are not in the wheel"
    out = installed_raylm(env_dir, "check", "quickstart", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\nname: quickstart\n" in out.stdout


def test_console_script_lists_copies_and_versions_recipes(fresh_env, tmp_path):
    env_dir, _ = fresh_env
    listed = installed_raylm(env_dir, "recipes", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any(line.startswith("quickstart ") for line in listed.stdout.splitlines()), listed.stdout
    copied = installed_raylm(env_dir, "init", "quickstart", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr[-2000:]
    assert (tmp_path / "quickstart.yaml").read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    version = installed_raylm(env_dir, "--version", cwd=tmp_path)
    # The wheel is this checkout's version, as the development environment's editable install reports it
    assert version.stdout.strip() == f"raylm {metadata.version('raylm')}", version.stdout + version.stderr


def test_console_script_lists_and_traces_runs_from_any_folder(fresh_env, tmp_path):
    """`raylm runs` and `raylm show` from the wheel, on a run's manifests (written by raylm's own
    lineage code): a curated folder and a training run made from it."""
    from raylm.core import lineage, outputs
    from raylm.core.artifacts import CURATED, RUN, TRAIN

    env_dir, _ = fresh_env
    run = tmp_path / "runs" / "demo"
    outputs.claim(str(run), RUN)
    curated = lineage.write_manifest(str(run / "curated"), CURATED, {"sources": [{"path": "corpus/"}]})
    assert curated["kind"] == CURATED
    lineage.write_manifest(
        str(run / "train"), TRAIN, {"max_steps": 3}, [str(run / "curated" / "manifest.json")]
    )
    listed = installed_raylm(env_dir, "runs", cwd=tmp_path)  # ./runs by default
    assert listed.returncode == 0, listed.stderr[-2000:]
    stages = [line.split()[:2] for line in listed.stdout.splitlines()[1:]]
    assert stages == [["curate", "complete"], ["train", "complete"]], listed.stdout
    shown = installed_raylm(env_dir, "show", str(run / "train"), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "max_steps: 3" in shown.stdout and str(run / "curated") in shown.stdout, shown.stdout
    missing = installed_raylm(env_dir, "show", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
