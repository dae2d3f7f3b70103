import os

import pytest

from raylm.core import outputs, storage


def test_staged_output_appears_only_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), outputs.staged_output(str(final), "test") as tmp:
        storage.write_text(os.path.join(tmp, "partial.txt"), "x")
        raise RuntimeError("crash mid-stage")
    assert not final.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name], "temporary folder must be cleaned up"

    with outputs.staged_output(str(final), "test") as tmp:
        storage.write_json(f"{tmp}/{storage.MANIFEST}", {"ok": True})
    assert storage.is_complete(str(final))
    assert storage.read_json(str(final / storage.MANIFEST)) == {"ok": True}


def test_list_and_write_text(tmp_path):
    storage.write_text(str(tmp_path / "a/b/c.txt"), "hello")
    storage.write_text(str(tmp_path / "a/d.parquet"), "x")
    assert storage.list_files(str(tmp_path / "a"), ".txt") == [str(tmp_path / "a/b/c.txt")]
    assert storage.read_text(str(tmp_path / "a/b/c.txt")) == "hello"
    assert storage.exists(str(tmp_path / "a")) and not storage.exists(str(tmp_path / "zzz"))
