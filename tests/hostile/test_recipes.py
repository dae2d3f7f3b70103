"""Hostile recipes and overrides, from seeded generators: every leaf of the config tree given values of the
wrong shape and type (as an override and inside a recipe file), whole recipe files that are not YAML
mappings, and overrides that are not `key.path=value`. Each must end as `raylm: error: ...` with exit 2,
naming the key where there is one, in at most a few lines, without a traceback.

In-process through core.cli.main (`raylm check`, which validates and starts nothing): the same code path
as the console script, at a few milliseconds per input.
"""

from __future__ import annotations

import os
import random
import typing
from pathlib import Path

import yaml

from raylm.core.cli import MAX_MESSAGE_LINES, main
from raylm.core.config import PlatformConfig
from raylm.core.schema import Section

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
ENTRY = "recipes and overrides"


def leaves(cls: type[Section] = PlatformConfig, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted key, annotation) of every field that is not itself a section; lists of sections
    (data.sources) are left to the file-level cases, since a dotted override cannot index them."""
    found = []
    for name, info in cls.model_fields.items():
        args = [a for a in typing.get_args(info.annotation) if a is not type(None)] or [info.annotation]
        sections = [a for a in args if isinstance(a, type) and issubclass(a, Section)]
        if not sections:
            found.append((prefix + name, info.annotation))
        elif typing.get_origin(info.annotation) is not list:
            found += leaves(sections[0], f"{prefix}{name}.")
    return found


def base_type(annotation) -> str:
    text = repr(annotation)
    for kind in ("bool", "int", "float", "Literal", "tuple", "dict", "list"):
        if kind in text.split("[", 1)[0] or text.startswith(f"<class '{kind}'>"):
            return kind
    if "check_path" in text:
        return "path"
    return "str" if "str" in text else "other"


# Values that are wrong for every field (no field takes a mapping of lists or a list of empty lists), and
# values wrong for one kind of field. None is never used: many fields are optional.
ANY_FIELD = ["{hostile: [1]}", "[[[]]]", "{a: {b: {c: {d: []}}}}"]
BY_TYPE = {
    "int": ["twelve", "1.5", "true", "0x", "1e999", "[1]", "9223372036854775808"],
    "float": ["fast", "true", ".nan", "-.inf", "[0.1]", "'1e'"],
    "bool": ["1", "'yes'", "on_", "0.0", "[true]"],
    "Literal": ["hostile-choice", "7", "[a]", "''"],
    "str": ["12", "[a, b]", "3.5", "true"],
    "path": ["'ftp://host/x'", "'http://x/y'", '"a\\0b"', "'s3://'", "'file://relative/x'"],
    "tuple": ["[0.1]", "[0.1, 0.2, 0.3]", "abc"],
    "dict": ["[1, 2]", "abc", "{x: [1]}"],
    "list": ["abc", "{a: 1}", "[[1]]"],
}


def field_cases(seed: int = 12) -> list[tuple[str, str, str]]:
    """(key, YAML value, delivery) for every leaf: one value wrong for any field, one wrong for its type;
    each delivered once as an override and once inside a recipe file (seeded: the same cases every run)."""
    rng = random.Random(seed)
    cases = []
    for key, annotation in leaves():
        typed = BY_TYPE.get(base_type(annotation), ANY_FIELD)
        cases.append((key, rng.choice(ANY_FIELD), rng.choice(["override", "recipe"])))
        cases.append((key, rng.choice(typed), rng.choice(["override", "recipe"])))
    return sorted(set(cases))


def with_key(tree: dict, key: str, value) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    *sections, last = key.split(".")
    node = tree
    for part in sections:
        node = node.setdefault(part, {}) if isinstance(node.get(part), dict | None) else node[part]
    node[last] = value
    return tree


def refused(capsys, argv: list[str]) -> str:
    """main(argv) in-process: exit 2, `raylm: error:` first, a few lines, no traceback; returns stderr."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own refusal (e.g. no recipe at all) is exit 2 too
        rc = exc.code
    out = capsys.readouterr()
    assert rc == 2, (argv[:3], out.err[-500:])
    assert "Traceback" not in out.err + out.out
    if out.err.startswith("raylm: error:"):
        assert len(out.err.splitlines()) <= MAX_MESSAGE_LINES, out.err
    else:
        assert "usage:" in out.err and "error:" in out.err, out.err
    return out.err


def test_field_generators_cover_every_leaf():
    keys = {key for key, _, _ in field_cases()}
    assert keys == {key for key, _ in leaves()} and len(keys) > 150


def test_every_field_with_a_wrong_value_names_its_key(tmp_path, capsys, tally):
    cases = field_cases()
    for i, (key, value, delivery) in enumerate(cases):
        if delivery == "override":
            err = refused(capsys, ["check", "quickstart", f"{key}={value}"])
        else:
            recipe = tmp_path / f"r{i}.yaml"
            recipe.write_text(yaml.safe_dump(with_key(QUICKSTART, key, yaml.safe_load(value))))
            err = refused(capsys, ["check", str(recipe)])
        assert key in err, (key, value, delivery, err)
    tally(ENTRY, "exit 2 naming the key", [f"field {c}" for c in cases])


def garbage_recipes(folder: Path, seed: int = 13) -> dict[str, Path]:
    """Recipe files that are not a YAML mapping of sections, or cannot be read at all."""
    rng = random.Random(seed)
    good = yaml.safe_dump(QUICKSTART)
    files: dict[str, bytes] = {f"random-bytes-{i}": rng.randbytes(rng.randrange(16, 4096)) for i in range(6)}
    files |= {
        "utf16": good.encode("utf-16"),
        "utf32": good.encode("utf-32"),
        "latin1-comment": (good + "# déjà vu\n").encode("latin-1"),
        "cut-multibyte": "name: caf\u00e9".encode()[:-1] + b"\n",
        "nul-bytes": good.encode().replace(b"\nseed", b"\n\x00seed", 1),
        "tab-indent": b"name: x\ndata:\n\tseq_len: 3\n",
        "unclosed-flow": b"name: x\nstages: [curate, train\n",
        "unclosed-quote": b'name: "x\n',
        "bad-anchor": b"name: *nowhere\n",
        "alias-bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\n"
        + b"".join(
            b"%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n" % ((98 + i,) * 2 + (97 + i,) * 9)
            for i in range(9)
        ),
        "top-list": b"- name: x\n",
        "top-scalar": b"just a string\n",
        "top-number": b"42\n",
        "python-tag": b"name: !!python/object/apply:os.system ['true']\n",
        "huge": b"name: x\n" + b"# padding\n" * 300_000,
        "deep-nesting": b"name: " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
        "unknown-sections": yaml.safe_dump({**QUICKSTART, "datta": {"seq_len": 3}}).encode(),
        "sources-not-a-list": yaml.safe_dump(with_key(QUICKSTART, "data.sources", {"path": "x"})).encode(),
        "source-without-path": yaml.safe_dump(
            with_key(QUICKSTART, "data.sources", [{"format": "jsonl"}])
        ).encode(),
        "source-path-number": yaml.safe_dump(with_key(QUICKSTART, "data.sources", [{"path": 5}])).encode(),
        "source-bad-format": yaml.safe_dump(
            with_key(QUICKSTART, "data.sources", [{"path": "x", "format": "csv"}])
        ).encode(),
        "stages-unknown": yaml.safe_dump({**QUICKSTART, "stages": ["curate", "deploy"]}).encode(),
        "huge-int": b"name: x\nseed: " + b"7" * 5000 + b"\n",
        "impossible-date": b"name: x\nseed: 2001-02-30\n",
        "no-name": yaml.safe_dump({k: v for k, v in QUICKSTART.items() if k != "name"}).encode(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_bytes(data)
    (folder / "a-dir.yaml").mkdir()
    os.symlink(folder / "loop-b.yaml", folder / "loop-a.yaml")
    os.symlink(folder / "loop-a.yaml", folder / "loop-b.yaml")
    os.symlink(folder / "missing.yaml", folder / "dangling.yaml")
    os.mkfifo(folder / "fifo.yaml")  # reading it would block forever: it must be refused unread
    os.chmod(paths["top-number"].with_name("unreadable.yaml").touch() or folder / "unreadable.yaml", 0)
    for name in ("a-dir", "loop-a", "dangling", "fifo", "unreadable"):
        paths[name] = folder / f"{name}.yaml"
    paths["nonexistent"] = folder / "nope.yaml"
    paths["name-too-long"] = folder / ("x" * 5000 + ".yaml")
    return paths


def test_garbage_recipe_files_exit_2(tmp_path, capsys, tally):
    paths = garbage_recipes(tmp_path)
    for name, path in paths.items():
        if name == "unreadable" and os.geteuid() == 0:
            continue  # root reads a mode-000 file
        refused(capsys, ["check", str(path)])
    tally(
        ENTRY, "exit 2", [f"recipe file {n}" for n in paths if not (n == "unreadable" and os.geteuid() == 0)]
    )


def override_cases(seed: int = 14) -> list[str]:
    rng = random.Random(seed)
    words = ["data", "train", "serve", "tune", "ray"]
    cases = [
        "data.seq_len",  # no '='
        "=5",
        ".seq_len=5",
        "data..seq_len=5",
        "data.seq_len.=5",
        "data.sources[0].path=x",
        "data.seq_len=[1",
        "data.seq_len={a: 1",
        "data.seq_len='unterminated",
        "data.seq_len=*alias",
        "data.seq_len=" + "9" * 5000,  # PyYAML's int() past sys.get_int_max_str_digits
        "seed=2026-13-45",  # PyYAML builds a date from it and raises ValueError
        "train.max_steps=0b2",
        "name=" + "n" * 200_000,
        "data.seq_len\x00=5",
        "name=a\x00b",
        "data.seq_len=\udcff",  # a non-UTF-8 argv byte, as Python hands it over (surrogateescape)
        "da\udcfeta.seq_len=5",
        "../../etc/passwd=1",
        "/abs/key=1",
        "data.seq_len=1\n  bad: indent",
        "data=5",
        "data.seq_len.deeper=5",
        "stages=[curate, nope]",
        "stages=curate",
        "seed=-1",
        "seed=4294967296",
        "run_dir=ftp://host/x",
        "data.output=gs://",
        "serve.http.port=0",
        "serve.http.port=65536",
        "data.eval_fraction=1.5",
        "a=1",
        "data.a.b.c.d=1",
    ]
    for _ in range(24):  # unknown keys under each section, seeded
        section = rng.choice(words)
        cases.append(
            f"{section}.{''.join(rng.choices('abcdefghijklmnopqrstuvwxyz_', k=rng.randrange(3, 12)))}=1"
        )
    return sorted(set(cases))


def test_malformed_overrides_exit_2(capsys, tally):
    cases = override_cases()
    for override in cases:
        err = refused(capsys, ["check", "quickstart", override])
        key = override.partition("=")[0]
        if key.count(".") >= 1 and key.replace(".", "").replace("_", "").isalpha() and "=" in override:
            assert key.split(".")[0] in err, (override, err)
    tally(ENTRY, "exit 2", [f"override {o!r}" for o in cases])
