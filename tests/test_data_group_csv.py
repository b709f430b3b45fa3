"""read_group_csv: alignment with the ids, name order, column options and every error."""
from __future__ import annotations

import pytest
import torch

from fairdistill.data.group_csv import read_group_csv
from fairdistill.errors import ConfigError, DataError


def write(tmp_path, text, name="groups.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_string_groups_sorted_and_aligned(tmp_path):
    path = write(tmp_path, "id,group,other\n2007_000032,light,x\n2007_000039,dark,y\n2008_000001,light,z\n")
    groups, names = read_group_csv(path, ["2008_000001", "2007_000039", "2007_000032"])
    assert names == ["dark", "light"]
    assert groups.dtype == torch.int64 and groups.tolist() == [1, 0, 1]


def test_names_come_from_the_whole_file_so_splits_agree(tmp_path):
    path = write(tmp_path, "id,group\na,2\nb,10\nc,1\n")
    g_a, names_a = read_group_csv(path, ["a"])
    g_b, names_b = read_group_csv(path, ["b", "c"])
    assert names_a == names_b == ["1", "2", "10"]  # integers sorted numerically
    assert g_a.tolist() == [1] and g_b.tolist() == [2, 0]


def test_column_options_bom_whitespace_and_blank_lines(tmp_path):
    path = tmp_path / "g.csv"
    path.write_bytes("\ufeffimage , skin\n a ,  s1 \n\nb,s0\n".encode("utf-8"))
    groups, names = read_group_csv(path, ["a", "b"], id_column="image", group_column="skin")
    assert names == ["s0", "s1"] and groups.tolist() == [1, 0]


@pytest.mark.parametrize("text,ids,match", [
    ("id,group\na,0\n", ["a", "zz"], "missing from .*zz"),
    ("id,grp\na,0\n", ["a"], "lacks column.*'group'"),
    ("", ["a"], "is empty"),
    ("id,group\n", ["a"], "no rows"),
    ("id,group\na,0\na,1\n", ["a"], "two groups"),
    ("id,group\na,\n", ["a"], "empty 'group'"),
    ("id,group\na\n", ["a"], "line 2 has 1 field"),
])
def test_bad_files_name_the_problem(tmp_path, text, ids, match):
    path = write(tmp_path, text)
    with pytest.raises(DataError, match=match) as err:
        read_group_csv(path, ids, key="data.options.group_csv")
    assert "data.options.group_csv" in str(err.value)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_group_csv(tmp_path / "nope.csv", ["a"])
    with pytest.raises(ConfigError, match="my.key"):
        read_group_csv(None, ["a"], key="my.key")
    with pytest.raises(ConfigError, match="id_column"):
        read_group_csv(write(tmp_path, "id,group\na,0\n"), ["a"], id_column="")
