"""--select: rows, ranges, keys, globs, order, and one-line errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lrpcli.commands.render.select import parse, resolve
from lrpcli.errors import DataError

N = 12
COLUMNS = {
    "label": np.arange(N) % 3,
    "target": (np.arange(N) + 1) % 3,
    "index": np.arange(N) * 10,
    "filename": np.array([f"c{i % 3}/img_{i:03d}.jpg" for i in range(N)], dtype=object),
}


def sel(spec: str | None, n: int = N) -> list[int]:
    asked: list[str] = []

    def column(name: str) -> np.ndarray:
        asked.append(name)
        return COLUMNS[name][:n]

    rows = resolve(spec, n, column, source="f.h5")
    assert rows.dtype == np.int64
    if spec is not None and re.fullmatch(r"[-0-9:, ]+", spec):
        assert asked == []  # plain rows and ranges never read a column
    return rows.tolist()


@pytest.mark.parametrize(
    ("spec", "rows"),
    [
        (None, list(range(N))),
        ("0:3", [0, 1, 2]),
        ("3,7,9", [3, 7, 9]),
        ("-1", [11]),
        ("::4", [0, 4, 8]),
        ("10:", [10, 11]),
        ("8:100", [8, 9, 10, 11]),
        ("-2:", [10, 11]),
        ("5,0:3,1", [5, 0, 1, 2]),
        (" 2 , 2 ,2", [2]),
        ("label=1", [1, 4, 7, 10]),
        ("target=0", [2, 5, 8, 11]),
        ("index=30", [3]),
        ("label=2,0", [2, 5, 8, 11, 0]),
        ("*_001.jpg", [1]),
        ("file=c1/*", [1, 4, 7, 10]),
        ("c0/img_003.jpg", [3]),
        ("img_00[0-2].jpg", [0, 1, 2]),
    ],
)
def test_selection(spec: str | None, rows: list[int]) -> None:
    assert sel(spec) == rows


def test_parse_kinds() -> None:
    kinds = [i.kind for i in parse("1,2:5,label=3,target=1,index=7,file=x*,*.png")]
    assert kinds == ["row", "slice", "label", "target", "index", "file", "file"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty item"),
        ("1,,2", "empty item"),
        ("1:x", "'1:x' is not a range"),
        ("1:2:0", "step 0"),
        ("foo=3", "unknown key 'foo'"),
        ("label=x", "label in 'label=x' must be an integer"),
        ("file=", "empty file pattern"),
        ("12", "row 12 is out of range; f.h5 has 12 rows (0-11)"),
        ("-13", "row -13 is out of range"),
        ("20:30", "'20:30' selects no rows"),
        ("label=9", "no row in f.h5 has label=9"),
        ("*.png", "matches '*.png'"),
    ],
)
def test_bad_selection(spec: str, needle: str) -> None:
    with pytest.raises(DataError) as err:
        sel(spec)
    msg = str(err.value)
    assert msg.startswith(f"--select '{spec}'") and needle in msg and "\n" not in msg
