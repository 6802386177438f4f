"""Colour palettes: named ones and a short text spec, each compiled to a 256 x 3 uint8 lookup table.

A palette is a list of colour stops. Rendering maps a normalised relevance value to an index 0..255 and looks
the colour up, so one palette is one ``(256, 3)`` uint8 array (a LUT) and colouring a whole batch is a single
numpy fancy-index.

Spec syntax (the same one the named palettes are written in)::

    STOP[,STOP...]         at least two stops
    STOP  = [POS:]COLOUR
    COLOUR = rgb | rrggbb  hex digits, e.g. f00 or ff0000
    POS   = 0..ff          the LUT index of the stop, in hex (80 is the centre, 128)

Stops without a position are placed evenly between their positioned neighbours; the first defaults to 00 and
the last to ff. Each position is rounded half up to an integer, positions must increase strictly. Entry ``i``
of the LUT is the linear interpolation between the two stops around ``i``, each channel rounded half up
(``floor(x + 0.5)``); entries before the first / after the last stop repeat that stop's colour. So
``0ff,00f,80:000,f00,ff0,fff`` is cyan at 0, blue at 64, black at 128 (the colour of zero under symmetric
normalisation), red at 170, yellow at 213 and white at 255.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lrpcli.errors import DataError

CENTRE = 128
"""LUT index of a zero relevance under symmetric normalisation: ``round((0 + 1) / 2 * 255)``, halves up."""

EXAMPLE_SPEC = "0ff,00f,80:000,f00,ff0,fff"


@dataclass(frozen=True)
class Named:
    """A built-in palette: its spec, whether it is signed (diverging, zero at the centre), and what it is.

    ``signed`` is the one place a palette's kind is declared: ``--list-cmaps``, the README table check and the
    palette/norm warning all read it.
    """

    spec: str
    signed: bool
    description: str

    @property
    def norm(self) -> str:
        """The normalisation that gives zero relevance a neutral colour with this palette."""
        return suited_norm(self.signed)


PALETTES: dict[str, Named] = {
    "gray": Named("000,fff", False, "black to white"),
    "wred": Named("fff,f00", False, "white to red"),
    "wblue": Named("fff,00f", False, "white to blue"),
    "hot": Named("000,f00,ff0,fff", False, "black, red, yellow, white"),
    "cold": Named("000,00f,0ff,fff", False, "black, blue, cyan, white"),
    "coldnhot": Named("fff,0ff,00f,80:000,f00,ff0,fff", True, "reversed cold below zero, hot above"),
    "bwr": Named("00f,80:fff,f00", True, "blue, white, red"),
    "france": Named("0055a4,80:fff,ef4135", True, "deep blue, white, deep red"),
    "seismic": Named("00004c,00f,80:fff,f00,800000", True, "dark blue, blue, white, red, dark red"),
    "coolio": Named("9ff,0bb,80:000,b0b,f9f", True, "cyan to magenta through black"),
    "coleus": Named("9f9,0b0,80:000,b0b,f9f", True, "green to magenta through black"),
}

_COLOUR = re.compile(r"^(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_POS = re.compile(r"^[0-9a-fA-F]{1,2}$")


def _colour(text: str, stop: str, spec: str) -> tuple[int, int, int]:
    """Parse ``rgb`` / ``rrggbb`` hex; the error names the stop and the whole spec."""
    if not _COLOUR.match(text):
        raise DataError(
            f"palette spec '{spec}': colour '{text}' in stop '{stop}' is not 3 or 6 hex digits "
            "(e.g. f00 or ff0000)"
        )
    if len(text) == 3:
        text = "".join(c * 2 for c in text)
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def parse_spec(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a palette spec into stop positions (float, 0..255, strictly increasing) and colours (n x 3).

    Kept separate from the LUT so tests and ``--list-cmaps`` can show where the stops are.
    """
    stops = [s.strip() for s in spec.split(",")]
    if len(stops) < 2 or any(not s for s in stops):
        raise DataError(
            f"palette spec '{spec}': needs at least two comma-separated colour stops, e.g. '{EXAMPLE_SPEC}'"
        )
    given: list[float | None] = []
    colours = []
    for stop in stops:
        pos_text, sep, colour_text = stop.rpartition(":")
        if sep:
            if not _POS.match(pos_text):
                raise DataError(
                    f"palette spec '{spec}': position '{pos_text}' in stop '{stop}' must be hex 00-ff "
                    "(80 is the centre)"
                )
            given.append(float(int(pos_text, 16)))
        else:
            given.append(None)
        colours.append(_colour(colour_text, stop, spec))
    if given[0] is None:
        given[0] = 0.0
    if given[-1] is None:
        given[-1] = 255.0
    # place unpositioned stops evenly between their positioned neighbours
    anchors = [i for i, p in enumerate(given) if p is not None]
    for a, b in zip(anchors, anchors[1:]):
        for k in range(a + 1, b):
            given[k] = given[a] + (given[b] - given[a]) * (k - a) / (b - a)
    positions = np.floor(np.asarray(given, dtype=np.float64) + 0.5)
    if np.any(np.diff(positions) <= 0):
        raise DataError(
            f"palette spec '{spec}': stop positions must increase strictly (got "
            f"{', '.join(format(int(p), '02x') for p in positions)} in hex)"
        )
    return positions, np.asarray(colours, dtype=np.float64)


def lut_from_spec(spec: str) -> np.ndarray:
    """Compile a spec to a ``(256, 3)`` uint8 LUT by linear interpolation between stops, rounded half up."""
    positions, colours = parse_spec(spec)
    x = np.arange(256, dtype=np.float64)
    lut = np.stack([np.interp(x, positions, colours[:, c]) for c in range(3)], axis=1)
    return np.floor(lut + 0.5).astype(np.uint8)


def palette(name_or_spec: str) -> np.ndarray:
    """The ``(256, 3)`` uint8 LUT of a named palette (case-insensitive) or of a spec of colour stops.

    A string without a comma must be a palette name, so a typo in a name gets an error listing the names.
    """
    key = name_or_spec.strip().lower()
    if key in PALETTES:
        return lut_from_spec(PALETTES[key].spec)
    if not key:
        raise DataError(
            f"empty palette name '{name_or_spec}': use one of {', '.join(PALETTES)} "
            f"or a spec of hex colour stops like '{EXAMPLE_SPEC}'"
        )
    if "," not in key:
        raise DataError(
            f"unknown palette '{name_or_spec}': use one of {', '.join(PALETTES)} "
            f"or a spec of hex colour stops like '{EXAMPLE_SPEC}'"
        )
    return lut_from_spec(key)


def is_signed(name_or_spec: str) -> bool:
    """Whether a palette diverges around its centre (named signed palettes; specs with a stop at 80)."""
    key = name_or_spec.strip().lower()
    if key in PALETTES:
        return PALETTES[key].signed
    positions, _ = parse_spec(key)
    return bool(np.any(positions == CENTRE))


def suited_norm(signed: bool) -> str:
    """``symmetric`` for a signed palette (zero at its centre entry), ``absolute`` for a sequential one."""
    return "symmetric" if signed else "absolute"


def _hex(colour: np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


def norm_mismatch(name_or_spec: str, norm: str) -> str | None:
    """Why ``norm`` gives this palette a coloured background, or None when the pair suits.

    Zero relevance (most of a map) should get the palette's neutral colour: the centre of a signed palette,
    the first entry of a sequential one. ``symmetric`` puts zero at the centre and ``absolute`` at the first
    entry, so a signed palette wants ``symmetric`` and a sequential one ``absolute`` (``unaligned`` stretches
    each map to its own min and max and suits a sequential palette on maps of one sign). The kind comes from
    the palette's declaration (``Named.signed``, or a stop at 80 in a spec).
    """
    signed = is_signed(name_or_spec)
    want = suited_norm(signed)
    if norm == want or (not signed and norm == "unaligned"):
        return None
    lut = palette(name_or_spec)
    kind = "diverging (zero at its centre)" if signed else "sequential (zero at its first colour)"
    if norm == "symmetric":
        zero = f"zero relevance gets its middle colour {_hex(lut[CENTRE])}"
    elif norm == "absolute":
        zero = f"zero relevance gets its first colour {_hex(lut[0])} and both signs look alike"
    else:
        zero = "zero relevance gets a colour that depends on each map's min and max"
    return f"--cmap {name_or_spec} is {kind}: with --norm {norm} {zero}, a coloured background; use --norm {want}"
