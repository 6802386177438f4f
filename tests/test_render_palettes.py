"""Palettes: named LUTs, the stop spec parser and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lrpcli.commands.render import palette
from lrpcli.commands.render.palettes import CENTRE, PALETTES, is_signed, lut_from_spec, norm_mismatch, parse_spec
from lrpcli.errors import DataError


def _hex(text: str) -> list[int]:
    text = "".join(c * 2 for c in text) if len(text) == 3 else text
    return [int(text[i : i + 2], 16) for i in (0, 2, 4)]


@pytest.mark.parametrize("name", list(PALETTES))
def test_named_palette_is_256_rgb_with_end_stops(name: str) -> None:
    lut = palette(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    stops = [s.rpartition(":")[2] for s in PALETTES[name].spec.split(",")]
    assert lut[0].tolist() == _hex(stops[0])
    assert lut[255].tolist() == _hex(stops[-1])


@pytest.mark.parametrize("name", [n for n, p in PALETTES.items() if p.signed])
def test_signed_palettes_are_centred(name: str) -> None:
    """The colour of zero (index 128) is exactly the stop placed at 80 (hex)."""
    positions, colours = parse_spec(PALETTES[name].spec)
    centre = int(np.flatnonzero(positions == CENTRE)[0])
    assert palette(name)[CENTRE].tolist() == colours[centre].astype(int).tolist()
    assert is_signed(name)


def test_expected_signed_set() -> None:
    signed = {n for n, p in PALETTES.items() if p.signed}
    assert signed == {"coldnhot", "bwr", "france", "seismic", "coolio", "coleus"}
    assert {"gray", "wred", "wblue", "hot", "cold"} <= set(PALETTES) - signed


def test_centre_colours() -> None:
    assert palette("coldnhot")[128].tolist() == [0, 0, 0]
    assert palette("bwr")[128].tolist() == [255, 255, 255]
    assert palette("seismic")[128].tolist() == [255, 255, 255]
    assert palette("coolio")[128].tolist() == [0, 0, 0]
    assert palette("coleus")[128].tolist() == [0, 0, 0]


def test_gray_is_identity() -> None:
    lut = palette("gray")
    assert np.array_equal(lut, np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))


def test_interpolation_rounds_half_up() -> None:
    # hot: stops at 0, 85, 170, 255; index 128 lies 43/85 of the way from red to yellow: G = 129.0
    assert palette("hot")[128].tolist() == [255, 129, 0]
    # bwr: index 64 halfway from blue to white: 127.5 -> 128
    assert palette("bwr")[64].tolist() == [128, 128, 255]


def test_spec_positions_and_placement() -> None:
    positions, colours = parse_spec("0ff,00f,80:000,f00,ff0,fff")
    assert positions.tolist() == [0, 64, 128, 170, 213, 255]
    assert colours[2].tolist() == [0, 0, 0]
    lut = lut_from_spec("0ff,00f,80:000,f00,ff0,fff")
    assert lut[64].tolist() == [0, 0, 255] and lut[170].tolist() == [255, 0, 0]


def test_spec_forms_and_case() -> None:
    assert np.array_equal(palette("F00,00F"), palette("ff0000,0000ff"))
    assert np.array_equal(palette("GRAY"), palette("gray"))
    # positions before the first stop / after the last repeat the end colours
    lut = palette("40:000,c0:fff")
    assert lut[0].tolist() == [0, 0, 0] and lut[0x40].tolist() == [0, 0, 0]
    assert lut[0xC0].tolist() == [255, 255, 255] and lut[255].tolist() == [255, 255, 255]
    assert lut[0x80].tolist() == [128, 128, 128]
    assert is_signed("00f,80:fff,f00") and not is_signed("000,fff")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "unknown palette 'nope'"),
        ("f00", "unknown palette 'f00'"),
        ("f00,", "at least two"),
        (",f00,fff", "at least two"),
        ("f00,zzz", "colour 'zzz'"),
        ("f00,ff", "colour 'ff'"),
        ("f00,1234", "colour '1234'"),
        ("100:f00,fff", "position '100'"),
        ("g0:f00,fff", "position 'g0'"),
        ("80:f00,40:fff", "increase strictly"),
        ("000,00:fff", "increase strictly"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(DataError) as err:
        palette(spec)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("name", list(PALETTES))
def test_norm_advice_follows_the_declaration(name: str) -> None:
    """Each palette's kind is declared once (``Named.signed``); the warning reads it, no second list."""
    named = PALETTES[name]
    assert named.norm == ("symmetric" if named.signed else "absolute")
    assert norm_mismatch(name, named.norm) is None
    other = "absolute" if named.signed else "symmetric"
    advice = norm_mismatch(name, other)
    assert advice is not None and advice.endswith(f"use --norm {named.norm}")
    assert ("diverging" in advice) == named.signed
    assert (norm_mismatch(name, "unaligned") is None) == (not named.signed)


def test_norm_advice_for_specs_and_names_any_case() -> None:
    assert norm_mismatch("0ff,00f,80:000,f00", "symmetric") is None  # a stop at 80: diverging
    assert norm_mismatch("000,f00", "absolute") is None
    assert norm_mismatch("000,f00", "symmetric") == (
        "--cmap 000,f00 is sequential (zero at its first colour): with --norm symmetric zero relevance gets its "
        "middle colour #800000, a coloured background; use --norm absolute"
    )
    assert norm_mismatch("BWR", "symmetric") is None


def test_readme_palette_table_matches_declarations() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].strip("`") in PALETTES and cells[1] in ("signed", "unsigned"):
            rows[cells[0].strip("`")] = cells[1] == "signed"
    assert rows == {name: named.signed for name, named in PALETTES.items()}


def test_empty_palette_name() -> None:
    with pytest.raises(DataError, match="empty palette name ''"):
        palette("")
