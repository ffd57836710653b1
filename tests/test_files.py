"""Outputs replaced whole or not at all, whether the old one is a file or a
dataset folder (``_files.write_replacing``: a local run writes files, a
distributed one folders, and either may redo the other's stage)."""

from __future__ import annotations

import polars as pl
import pytest

from polars_singlecell._files import write_replacing


def _old(path, kind):
    if kind == "file":
        pl.DataFrame({"a": [1]}).write_parquet(path)
    else:
        path.mkdir()
        pl.DataFrame({"a": [1]}).write_parquet(path / "part-00000.parquet")


def _new(kind):
    def write(tmp):
        if kind == "file":
            pl.DataFrame({"a": [2, 3]}).write_parquet(tmp)
        else:
            tmp.mkdir()
            pl.DataFrame({"a": [2]}).write_parquet(tmp / "part-00000.parquet")
            pl.DataFrame({"a": [3]}).write_parquet(tmp / "part-00001.parquet")
    return write


@pytest.mark.parametrize("old", ["none", "file", "folder"])
@pytest.mark.parametrize("new", ["file", "folder"])
def test_a_new_output_replaces_a_file_or_a_folder(tmp_path, old, new):
    final = tmp_path / "cells.parquet"
    if old != "none":
        _old(final, old)
    write_replacing(final, _new(new))
    assert final.is_file() == (new == "file")
    assert pl.read_parquet(final)["a"].to_list() == [2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["cells.parquet"]


@pytest.mark.parametrize("old", ["file", "folder"])
@pytest.mark.parametrize("new", ["file", "folder"])
def test_a_failed_write_leaves_the_old_output(tmp_path, old, new):
    final = tmp_path / "cells.parquet"
    _old(final, old)

    def failing(tmp):
        _new(new)(tmp)  # written whole under the hidden name...
        raise RuntimeError("killed")  # ...then the stage fails before the swap

    with pytest.raises(RuntimeError, match="killed"):
        write_replacing(final, failing)
    assert final.is_file() == (old == "file")
    assert pl.read_parquet(final)["a"].to_list() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["cells.parquet"]
