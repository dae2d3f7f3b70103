"""Malformed recipes and overrides fail at load with a ConfigError that names the key, in a few lines.

The numeric, boolean and float cases are generated from the config tree itself (every field of every
section), so a field added later without a bound or with a bare `int` / `bool` fails here.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml

from raylm.core.config import (
    MAX_RECIPE_BYTES,
    PlatformConfig,
    build_config,
    deep_merge,
    load_config,
    parse_overrides,
)
from raylm.core.errors import ConfigError
from raylm.core.schema import Section

# A recipe that sets every optional section, so every field of the tree is reachable by an override.
FULL: dict[str, Any] = {
    "name": "full",
    "stages": ["curate", "train", "serve"],
    "ray": {"num_cpus": 2},
    "data": {"sources": [{"path": "corpus/"}], "near_dedup": {"bands": 8, "rows": 4}},
    "train": {"model": {"from_scratch": {"num_kv_heads": 2}}, "peak_flops": 1e12, "seed": 3},
    "serve": {"num_replicas": None, "autoscaling": {}, "max_context": 64},
}
MAX_MESSAGE_LINES = 10


def leaves(model: type[Section], prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, kind, how to set a bad value) for each int / float / bool value in the tree."""
    found = []
    for name, field in model.model_fields.items():
        found += _leaves_of(field.annotation, f"{prefix}{name}", lambda v: v)
    return found


def _strip(tp: Any) -> Any:
    """The type under Annotated[...] and Optional[...]."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _leaves_of(tp: Any, key: str, wrap) -> list[tuple[str, str, Any]]:
    tp = _strip(tp)
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Section):
        return [(k, kind, lambda v, w=wrap, s=s: w(s(v))) for k, kind, s in leaves(tp, key + ".")]
    if tp is bool:
        return [(key, "bool", wrap)]
    if tp in (int, float):
        return [(key, tp.__name__, wrap)]
    if origin is Literal and all(type(a) is int for a in get_args(tp)):
        return [(key, "int", wrap)]
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        # A valid key of the dict's key type: n-gram sizes are ints, sensitive-content categories are
        # names (profanity has a shipped list, so the category is complete without files).
        good = 2 if _strip(k_tp) is int else "profanity"
        values = (
            # The value is a section: nest each leaf under its field names, as _tree_for does at the top.
            [
                (
                    f"{key}.{good}.{k}",
                    kind,
                    lambda v, w=wrap, g=good, k=k, s=s: w({g: _tree_for(k.split("."), s(v), _strip(v_tp))}),
                )
                for k, kind, s in leaves(_strip(v_tp))
            ]
            if isinstance(_strip(v_tp), type) and issubclass(_strip(v_tp), Section)
            else _leaves_of(v_tp, f"{key}.{good}", lambda v, w=wrap, g=good: w({g: v}))
        )
        return [*_leaves_of(k_tp, f"{key}.[key]", lambda v, w=wrap: w({v: 0.1})), *values]
    if origin is tuple:
        args = get_args(tp)
        return [
            leaf
            for i, a in enumerate(args)
            for leaf in _leaves_of(
                a,
                f"{key}.{i}",
                lambda v, w=wrap, i=i, n=len(args): w([v if j == i else 0.5 for j in range(n)]),
            )
        ]
    if origin is list:
        return _leaves_of(get_args(tp)[0], f"{key}.0", lambda v, w=wrap: w([v]))
    return []


def set_leaf(key: str, value: Any) -> dict[str, Any]:
    """FULL with the field at `key` (as found by `leaves`) set to `value`."""
    setter = {k: s for k, _, s in LEAVES}[key]
    parts = key.split(".")
    # The setter of a nested leaf already builds the value for the first non-section part.
    tree = _tree_for(parts, setter(value))
    return deep_merge(FULL, tree)


def _tree_for(parts: list[str], value: Any, root: type[Section] = PlatformConfig) -> dict[str, Any]:
    """Nest `value` under the section path of a leaf key below `root` (stopping at the field that owns the value)."""
    node: Any = root
    path = []
    for part in parts:
        if not (isinstance(node, type) and issubclass(node, Section)):
            break
        path.append(part)
        node = _strip(node.model_fields[part].annotation)
        if get_origin(node) is list:
            break
    tree: Any = value
    for part in reversed(path):
        tree = {part: tree}
    return _merge_lists(tree)


def _merge_lists(tree: dict[str, Any]) -> dict[str, Any]:
    # data.sources is a list of sections: keep FULL's single source and change only its fields.
    sources = tree.get("data", {}).get("sources")
    if isinstance(sources, list) and sources and isinstance(sources[0], dict):
        tree["data"]["sources"] = [{**FULL["data"]["sources"][0], **sources[0]}]
    return tree


LEAVES = leaves(PlatformConfig)
NUMERIC = [k for k, kind, _ in LEAVES if kind in ("int", "float")]
FLOATS = [k for k, kind, _ in LEAVES if kind == "float"]
INTS = [k for k, kind, _ in LEAVES if kind == "int"]
BOOLS = [k for k, kind, _ in LEAVES if kind == "bool"]


def assert_refused(raw: dict[str, Any], key: str) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    message = str(err.value)
    # A bad n-gram size is reported as <field>.<size>.[key]; everything else under its own key.
    assert key.removesuffix("[key]") in message, message
    assert err.value.exit_code == 2
    assert len(message.splitlines()) <= MAX_MESSAGE_LINES, message
    return message


def test_full_recipe_is_valid_and_reaches_every_section():
    cfg = build_config(FULL)
    assert cfg.train.model.from_scratch is not None and cfg.serve.autoscaling is not None
    # Sanity of the generator: it found the fields this file is about.
    assert {"seed", "train.seed", "data.near_dedup.seed", "train.schedule.lr", "ray.num_cpus"} <= set(NUMERIC)
    assert {"train.use_gpu", "ray.include_dashboard", "data.exact_dedup"} <= set(BOOLS)
    assert "data.filters.max_top_ngram_fraction.2" in FLOATS and "train.schedule.betas.1" in FLOATS
    assert len(NUMERIC) >= 70 and len(BOOLS) >= 20


@pytest.mark.parametrize("key", NUMERIC)
def test_every_number_refuses_a_boolean(key):
    message = assert_refused(set_leaf(key, True), key)
    assert "not a boolean" in message


@pytest.mark.parametrize("key", NUMERIC)
def test_every_number_has_a_lower_bound(key):
    assert_refused(set_leaf(key, -1_000_000), key)


@pytest.mark.parametrize("key", INTS)
def test_every_integer_refuses_values_beyond_int64(key):
    assert_refused(set_leaf(key, 2**64), key)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "-inf", "1e400"])
@pytest.mark.parametrize("key", FLOATS)
def test_every_float_refuses_nan_and_infinity(key, value):
    assert_refused(set_leaf(key, value), key)


@pytest.mark.parametrize("value", [1, 0, "yes", "true", "on", 1.0, "1", None])
@pytest.mark.parametrize("key", BOOLS)
def test_every_switch_is_a_strict_boolean(key, value):
    assert_refused(set_leaf(key, value), key)


@pytest.fixture(scope="module")
def full_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "full.yaml"
    path.write_text(yaml.safe_dump(FULL))
    return path


OUT_OF_RANGE = [
    # fractions of a document outside [0, 1]
    ("data.filters.max_digit_fraction=1.5", "data.filters.max_digit_fraction"),
    ("data.filters.max_digit_fraction=-0.1", "data.filters.max_digit_fraction"),
    ("data.filters.min_alpha_word_fraction=2", "data.filters.min_alpha_word_fraction"),
    ("data.filters.max_duplicate_line_fraction=-1", "data.filters.max_duplicate_line_fraction"),
    ("data.filters.max_bullet_line_fraction=1.01", "data.filters.max_bullet_line_fraction"),
    ("data.filters.max_symbol_word_ratio=3", "data.filters.max_symbol_word_ratio"),
    ("data.filters.max_top_ngram_fraction={2: 0}", "data.filters.max_top_ngram_fraction.2"),
    ("data.filters.max_duplicate_ngram_fraction={5: 1.2}", "data.filters.max_duplicate_ngram_fraction.5"),
    ("data.filters.max_top_ngram_fraction={0: 0.1}", "data.filters.max_top_ngram_fraction.0"),
    ("data.filters.max_top_ngram_fraction={101: 0.1}", "data.filters.max_top_ngram_fraction.101"),
    ("data.eval_fraction=1", "data.eval_fraction"),
    # counts below zero, word lengths that cannot be
    ("data.filters.min_words=-5", "data.filters.min_words"),
    ("data.filters.max_words=-1", "data.filters.max_words"),
    ("data.filters.min_stop_words=-1", "data.filters.min_stop_words"),
    ("data.filters.min_mean_word_length=-1", "data.filters.min_mean_word_length"),
    ("data.filters.max_mean_word_length=0", "data.filters.max_mean_word_length"),
    ("data.filters.min_mean_word_length=12", "min_mean_word_length (12.0) is larger"),
    # seeds outside numpy / torch / random's 0..2**32-1
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("train.seed=-1", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("train.seed=18446744073709551616", "train.seed"),
    ("data.near_dedup.seed=-1", "data.near_dedup.seed"),
    ("data.near_dedup.seed=4294967296", "data.near_dedup.seed"),
    # resources
    ("ray.num_cpus=-1", "ray.num_cpus"),
    ("ray.num_cpus=0", "ray.num_cpus"),
    ("ray.num_cpus=1000000000", "ray.num_cpus"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker"),
    ("serve.num_cpus=-1", "serve.num_cpus"),
    ("serve.num_gpus=-0.5", "serve.num_gpus"),
    # sizes that would hang or exhaust a worker
    ("data.near_dedup.num_perm=1000000000", "data.near_dedup.num_perm"),
    ("data.near_dedup.ngram=0", "data.near_dedup.ngram"),
    ("data.near_dedup.ngram=1000000", "data.near_dedup.ngram"),
    ("data.near_dedup.threshold=1", "data.near_dedup.threshold"),
    ("data.near_dedup.bands=0", "data.near_dedup.bands"),
    ("data.seq_len=1099511627776", "data.seq_len"),
    ("data.tokenizer.vocab_size=1099511627776", "data.tokenizer.vocab_size"),
    # optimizer and model
    ("train.model.from_scratch.rope_theta=0", "train.model.from_scratch.rope_theta"),
    ("train.model.from_scratch.rope_theta=-10000", "train.model.from_scratch.rope_theta"),
    ("train.model.from_scratch.num_kv_heads=0", "train.model.from_scratch.num_kv_heads"),
    ("train.schedule.betas=[1.0, 0.95]", "train.schedule.betas.0"),
    ("train.schedule.betas=[0.9, -0.1]", "train.schedule.betas.1"),
    ("train.schedule.lr=0", "train.schedule.lr"),
    ("train.schedule.lr=10", "train.schedule.lr"),
    ("train.schedule.eps=0", "train.schedule.eps"),
    ("train.schedule.warmup_steps=-1", "train.schedule.warmup_steps"),
    ("train.deepspeed.grad_clip=-1", "train.deepspeed.grad_clip"),
    ("train.peak_flops=0", "train.peak_flops"),
    ("train.peak_flops=-1e12", "train.peak_flops"),
    ("train.lora.dropout=1", "train.lora.dropout"),
    ("train.checkpoint.max_failures=-2", "train.checkpoint.max_failures"),
    ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage"),
    # serving
    ("serve.http.port=0", "serve.http.port"),
    ("serve.http.port=65536", "serve.http.port"),
    ("serve.http.port=-1", "serve.http.port"),
    ("serve.retry_after_s=1e9", "serve.retry_after_s"),
    ("serve.batching.batch_wait_timeout_s=11", "serve.batching.batch_wait_timeout_s"),
    ("serve.autoscaling.target_ongoing_requests=0", "serve.autoscaling.target_ongoing_requests"),
]


@pytest.mark.parametrize("override, key", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_fail_naming_the_key(full_recipe, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(full_recipe, [override])
    assert key in str(err.value)
    assert len(str(err.value).splitlines()) <= MAX_MESSAGE_LINES


@pytest.mark.parametrize(
    "override",
    [
        "seed=0",
        "seed=4294967295",
        "train.seed=4294967295",
        "data.near_dedup.seed=0",
        "train.schedule.lr=1",  # a YAML int is a fine float
        "train.schedule.lr=1e-4",  # PyYAML reads 1e-4 as a string; pydantic's float parses it
        "train.model.from_scratch.rope_theta=500000",
        "serve.num_cpus=2",
        "serve.http.port=65535",
        "data.filters.max_digit_fraction=0",
        "data.filters.max_top_ngram_fraction={2: 1}",
        "data.filters.min_words=null",
        "train.use_gpu=false",
        "ray.num_cpus=null",
    ],
)
def test_edge_values_that_mean_something_still_load(full_recipe, override):
    load_config(full_recipe, [override])


def test_dumped_config_loads_again():
    """Manifests and Ray workers rebuild sections from dump_config's JSON (n-gram keys become strings)."""
    import json

    from raylm.core.config import dump_config

    cfg = build_config(FULL)
    again = build_config(json.loads(json.dumps(dump_config(cfg))))
    assert again == cfg


BAD_PATHS = [
    "ftp://host/corpus",
    "http://example.com/corpus",
    "https://example.com/corpus.jsonl",
    "sftp://host/x",
    "smb://server/share",
    "hf://datasets/x",
    "s3://",
    "gs:///no-bucket",
    "file://somehost/x",
    "a\x00b",
    "/" + "x" * 5000,
]
PATH_KEYS = [
    "run_dir",
    "data.sources.0.path",
    "data.output",
    "data.tokenizer.path",
    "train.data_dir",
    "train.output",
    "train.model.path",
    "train.checkpoint.storage_path",
    "train.checkpoint.resume_from",
    "serve.model",
    "serve.adapters.paths.ad",
    "serve.adapters.dirs.0",
]


def _with_path(key: str, value: str) -> dict[str, Any]:
    if key == "data.sources.0.path":
        return deep_merge(FULL, {"data": {"sources": [{"path": value}]}})
    if key == "serve.adapters.paths.ad":
        return deep_merge(FULL, {"serve": {"adapters": {"paths": {"ad": value}}}})
    if key == "serve.adapters.dirs.0":
        return deep_merge(FULL, {"serve": {"adapters": {"dirs": [value]}}})
    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return deep_merge(FULL, tree)


@pytest.mark.parametrize("value", BAD_PATHS, ids=lambda v: repr(v[:20]))
@pytest.mark.parametrize("key", PATH_KEYS)
def test_paths_pyarrow_cannot_open_fail_naming_the_key(key, value):
    message = assert_refused(_with_path(key, value), key)
    assert len(message) < 1000


@pytest.mark.parametrize(
    "value, resolved",
    [
        ("s3://bucket/x", "s3://bucket/x"),
        ("gs://bucket/x", "gs://bucket/x"),
        ("gcs://bucket/x", "gcs://bucket/x"),
        ("hdfs://namenode:9000/x", "hdfs://namenode:9000/x"),
        ("abfs://c@acct.dfs.core.windows.net/x", "abfs://c@acct.dfs.core.windows.net/x"),
        ("abfss://c@acct.dfs.core.windows.net/x", "abfss://c@acct.dfs.core.windows.net/x"),
        ("file:///tmp/my%20corpus", "/tmp/my corpus"),
        ("file://localhost/tmp/x", "/tmp/x"),
        ("/abs/corpus", "/abs/corpus"),
    ],
)
def test_supported_locations_load(value, resolved):
    cfg = build_config(_with_path("data.sources.0.path", value))
    assert cfg.data.sources[0].path == resolved
    cfg = build_config(_with_path("train.checkpoint.storage_path", value))
    assert cfg.train.checkpoint.storage_path == resolved


def test_builtin_source_is_the_only_builtin():
    assert build_config(_with_path("data.sources.0.path", "builtin:python-docs")).data.sources[0].path == (
        "builtin:python-docs"
    )
    assert_refused(_with_path("data.sources.0.path", "builtin:wikipedia"), "data.sources.0.path")


NOT_UTF8 = {
    "latin1-comment": "name: x  # café\n".encode("latin-1"),
    "utf16-le-bom": "name: x\n".encode("utf-16"),
    "utf16-be-bom": b"\xfe\xff" + "name: x\n".encode("utf-16-be"),
    "utf32-bom": "name: x\n".encode("utf-32"),
    "binary": bytes(range(256)) * 4,
    "png-header": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "gzip": b"\x1f\x8b\x08\x00" + b"\x00" * 16,
    "truncated-multibyte": b"name: caf\xc3",
    "overlong-slash": b"name: \xc0\xaf\n",
    "encoded-surrogate": b"name: \xed\xa0\x80\n",
}


@pytest.mark.parametrize("data", NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_recipe_that_is_not_utf8_is_refused(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)


def test_utf8_with_byte_order_mark_still_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(FULL).encode())
    assert load_config(path).name == "full"


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


def _flow_bomb(levels: int = 9, width: int = 9) -> str:
    """The same bomb as one flow sequence, so it fits in one field or one override value."""
    items = ['&a0 ["lol"]']
    for i in range(1, levels):
        items.append(f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "[" + ", ".join(items) + "]"


MALFORMED_RECIPES = {
    "alias-bomb": (f"name: x\n{_bomb()}\n", "expands to more than"),
    "alias-bomb-in-a-field": (f"name: x\ndata:\n  sources: {_flow_bomb()}\n", "expands to more than"),
    "self-referencing-alias": ("name: &a [*a]\n", "alias contains itself"),
    "deep-nesting": ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    "list-at-top": ("- a\n- b\n", "must be a mapping"),
    "scalar-at-top": ("just text\n", "must be a mapping"),
    "nul-character": ("name: a\x00b\n", "not valid YAML"),
    "tab-indentation": ("name: x\ndata:\n\tsources: []\n", "not valid YAML"),
    "two-documents": ("name: a\n---\nname: b\n", "not valid YAML"),
    "unhashable-key": ("? [a, b]\n: 1\n", "not valid YAML"),
    "long-line-syntax-error": ("name: [" + "x, " * 30_000 + "\n", "not valid YAML"),
    "unknown-tag": ("name: !!python/object:os.system x\n", "not valid YAML"),
}


@pytest.mark.parametrize("text, fragment", MALFORMED_RECIPES.values(), ids=MALFORMED_RECIPES.keys())
def test_malformed_recipe_gives_a_short_message(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(_recipe(tmp_path, text))
    message = str(err.value)
    assert fragment in message
    assert len(message.splitlines()) <= MAX_MESSAGE_LINES and len(message) < 1500, message[:3000]


def test_recipe_larger_than_the_limit_is_refused(tmp_path):
    path = _recipe(tmp_path, "name: x\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_recipe_path_that_is_a_directory_or_unusable(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path / "dir.yaml")
    with pytest.raises(ConfigError, match=r"cannot be opened|not found"):
        load_config("x" * 10_000)


def test_thousand_unknown_keys_give_a_few_lines(tmp_path):
    text = yaml.safe_dump({**FULL, **{f"unknown_{i}": i for i in range(1000)}})
    with pytest.raises(ConfigError) as err:
        load_config(_recipe(tmp_path, text))
    lines = str(err.value).splitlines()
    assert len(lines) <= 7 and lines[-1] == "  ... and 995 more", lines


def test_long_bad_value_is_cut_in_the_message(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config({**FULL, "seed": "9" * 100_000})
    assert len(str(err.value)) < 400


MALFORMED_OVERRIDES = {
    "alias-bomb": (f"name={_flow_bomb()}", "expands to more than"),
    "alias-bomb-in-a-section": (f"data.sources={_flow_bomb()}", "expands to more than"),
    "self-referencing-alias": ("name=&a [*a]", "alias contains itself"),
    "huge-value": ("name=" + "x" * 200_000, "characters long"),
    "huge-key": ("a" * 200_000 + "=1", "characters long"),
    "deep-key": (".".join(["a"] * 200) + "=1", "nested more than"),
    "deep-value": ("name=" + "[" * 5000 + "]" * 5000, "nested"),
    "invalid-yaml-long": ("name=[" + "x, " * 10_000, "not valid YAML"),
    "no-equals-long": ("x" * 200_000, "key.path=value"),
}


@pytest.mark.parametrize("override, fragment", MALFORMED_OVERRIDES.values(), ids=MALFORMED_OVERRIDES.keys())
def test_malformed_override_gives_a_short_message(full_recipe, override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(full_recipe, [override])
    message = str(err.value)
    assert fragment in message
    assert len(message.splitlines()) <= MAX_MESSAGE_LINES and len(message) < 1000, message[:3000]


def test_overrides_keep_working():
    assert parse_overrides(["train.schedule.betas=[0.8, 0.9]", "name=demo"]) == {
        "train": {"schedule": {"betas": [0.8, 0.9]}},
        "name": "demo",
    }
    assert build_config(deep_merge(FULL, parse_overrides(["train.schedule.betas=[0.8, 0.9]"])))


# --- data.tokenizer.path is loaded before Ray starts (pipelines.tokenize.check_tokenizer_dir) ---


def _garbage_tokenizer(tmp_path, files: dict[str, str]):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


BAD_TOKENIZERS = {
    "missing": (lambda p: str(p / "nope"), "does not exist"),
    "empty-folder": (lambda p: _garbage_tokenizer(p, {}), "empty folder"),
    "garbage-tokenizer-json": (lambda p: _garbage_tokenizer(p, {"tokenizer.json": "{not json"}), "not a"),
    "empty-json-object": (lambda p: _garbage_tokenizer(p, {"tokenizer.json": "{}"}), "not a"),
    "binary-tokenizer-json": (lambda p: _garbage_tokenizer(p, {"tokenizer.json": "\x00\x01\x02"}), "not a"),
    "model-config-only": (
        lambda p: _garbage_tokenizer(p, {"config.json": '{"model_type": "llama"}'}),
        "not a",
    ),
    "garbage-tokenizer-config": (
        lambda p: _garbage_tokenizer(p, {"tokenizer_config.json": "[1, 2"}),
        "not a",
    ),
}


@pytest.mark.parametrize("make, fragment", BAD_TOKENIZERS.values(), ids=BAD_TOKENIZERS.keys())
def test_bad_tokenizer_dir_is_refused_naming_the_key(tmp_path, make, fragment):
    from raylm.pipelines.tokenize import check_tokenizer_dir

    path = make(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_tokenizer_dir(path, "data.tokenizer.path")
    message = str(err.value)
    assert message.startswith("data.tokenizer.path: ") and fragment in message, message
    assert len(message.splitlines()) == 1 and len(message) < 600


def test_tokenizer_path_that_is_a_file(tmp_path):
    from raylm.pipelines.tokenize import check_tokenizer_dir

    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.path: .* is not a folder"):
        check_tokenizer_dir(str(tmp_path / "tokenizer.json"), "data.tokenizer.path")


def test_tokenizer_without_eos_is_refused(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from raylm.pipelines.tokenize import check_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(ConfigError, match="without an eos token"):
        check_tokenizer_dir(str(tmp_path / "no-eos"), "data.tokenizer.path")


def test_good_tokenizer_dir_passes(tiny_tokenizer_dir):
    from raylm.pipelines.tokenize import check_tokenizer_dir

    check_tokenizer_dir(tiny_tokenizer_dir, "data.tokenizer.path")
    cfg = build_config(deep_merge(FULL, {"data": {"tokenizer": {"path": f"file://{tiny_tokenizer_dir}"}}}))
    check_tokenizer_dir(cfg.data.tokenizer.path, "data.tokenizer.path")  # file:// became a local path
