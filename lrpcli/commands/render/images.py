"""Pixels: palette lookup, overlay blending, resizing layer maps, grid montages, swatches and saving.

Everything here takes and returns numpy arrays (uint8 ``H x W x 3`` images) so it can be tested pixel by
pixel; Pillow is used only to resize, draw text and encode files.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
GRID_PAD = 4
GRID_BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def colorize(index: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Palette indices (any shape, uint8) to RGB (same shape + 3) with one numpy lookup (``take``: 2x faster
    than fancy indexing)."""
    return np.take(lut, index, axis=0)


def overlay(heat: np.ndarray, image: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """Blend heatmaps over images: ``floor(alpha * heat + (1 - alpha) * image + 0.5)`` per channel, uint8.

    ``alpha`` is one number or one weight per pixel (the heatmaps' shape without the colour axis, e.g.
    ``(N, H, W)``); a pixel with alpha 0 is the image pixel exactly. Shapes broadcast, so a batch
    ``(N, H, W, 3)`` works as well as one image.
    """
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim:
        a = a[..., None]
    out = heat.astype(np.float32) * a
    out += image.astype(np.float32) * (np.float32(1.0) - a)
    out += 0.5
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def resize_maps(maps: np.ndarray, size: tuple[int, int], resample: str = "nearest") -> np.ndarray:
    """Resize float maps ``(N, h, w)`` to ``size = (H, W)`` (Pillow mode F): layer relevance to the input.

    Done on the values, before the palette, so bilinear interpolation never invents colours off the palette.
    """
    h, w = size
    if maps.shape[1:] == (h, w):
        return maps
    method = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}[resample]
    out = np.empty((maps.shape[0], h, w), dtype=np.float32)
    for i, m in enumerate(maps):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize((w, h), method))
    return out


@lru_cache(maxsize=1)
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font (cached: loading it costs a few ms)."""
    return ImageFont.load_default()


def label_height() -> int:
    """Height in pixels of the label strip under each grid tile: the default font's line height plus 4."""
    left, top, right, bottom = font().getbbox("Ag|0_")
    return int(bottom) + 4


@dataclass(frozen=True)
class GridGeometry:
    """Where tiles go: ``columns x rows`` tiles of ``tile_h x tile_w``, each with a label strip below it."""

    columns: int
    rows: int
    tile_h: int
    tile_w: int
    label_h: int
    pad: int = GRID_PAD

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole montage."""
        return (
            self.rows * (self.tile_h + self.label_h) + (self.rows + 1) * self.pad,
            self.columns * self.tile_w + (self.columns + 1) * self.pad,
        )

    def origin(self, k: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of tile ``k`` (row-major)."""
        r, c = divmod(k, self.columns)
        return self.pad + r * (self.tile_h + self.label_h + self.pad), self.pad + c * (self.tile_w + self.pad)


def grid_geometry(n: int, tile_h: int, tile_w: int, columns: int | None = None) -> GridGeometry:
    """Layout for ``n`` tiles: ``columns`` given or ``ceil(sqrt(n))``, as many rows as needed."""
    cols = max(1, min(n, columns if columns else math.ceil(math.sqrt(n))))
    return GridGeometry(cols, math.ceil(n / cols), tile_h, tile_w, label_height())


def grid(tiles: list[np.ndarray] | np.ndarray, labels: list[str], columns: int | None = None) -> np.ndarray:
    """One montage of equal-size RGB tiles, each label drawn under its tile (clipped to the tile width)."""
    n = len(tiles)
    th, tw = tiles[0].shape[:2]
    geo = grid_geometry(n, th, tw, columns)
    canvas = np.empty((*geo.size, 3), dtype=np.uint8)
    canvas[...] = GRID_BACKGROUND
    for k, tile in enumerate(tiles):
        y, x = geo.origin(k)
        canvas[y : y + th, x : x + tw] = tile
    image = Image.fromarray(canvas)
    for k, text in enumerate(labels):
        y, x = geo.origin(k)
        strip = Image.new("RGB", (tw, geo.label_h), GRID_BACKGROUND)
        ImageDraw.Draw(strip).text((1, 2), text, fill=TEXT_COLOUR, font=font())
        image.paste(strip, (x, y + th))
    return np.asarray(image)


def swatches(luts: dict[str, np.ndarray], height: int = 16, name_w: int = 72) -> np.ndarray:
    """A strip per palette: its name, then its 256 colours left to right (one pixel each)."""
    row_h = height + 2
    canvas = np.full((row_h * len(luts) + 2, name_w + 256 + 2, 3), 255, dtype=np.uint8)
    for i, lut in enumerate(luts.values()):
        y = 2 + i * row_h
        canvas[y : y + height, name_w : name_w + 256] = lut[None, :, :]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(luts):
        draw.text((2, 2 + i * row_h + 2), name, fill=TEXT_COLOUR, font=font())
    return np.asarray(image)


def save(image: np.ndarray, path: str | Path, fmt: str = "png", lut: np.ndarray | None = None) -> None:
    """Encode one image: RGB ``(H, W, 3)``, or palette indices ``(H, W)`` with their ``lut``.

    Indices become a palette PNG (exact colours, a third of the data to compress); JPEG and WebP get RGB.
    PNG uses compress_level 1 (fast, still lossless), JPEG and WebP quality 90. The file is written by
    ``write_new`` and never through an existing link.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(FORMATS)}")
    if image.ndim == 2 and lut is not None:
        if fmt == "png":
            pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
            pil.putpalette(lut.tobytes())
        else:
            pil = Image.fromarray(colorize(image, lut))
    else:
        pil = Image.fromarray(np.ascontiguousarray(image))
    with write_new(path) as fh:
        if fmt == "png":
            pil.save(fh, "PNG", compress_level=1)
        elif fmt == "jpg":
            pil.save(fh, "JPEG", quality=90)
        else:
            pil.save(fh, "WEBP", quality=90, method=2)


@contextlib.contextmanager
def write_new(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace ``path`` when the block ends without an error.

    Why: an output folder may hold a link planted by someone else (``x.png -> ../victim``); opening the name
    for writing would follow it and overwrite the victim. Instead the bytes go to a new file in the same
    folder, created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (it cannot be a link), which ``os.replace`` then
    renames onto the name: a link there is replaced itself, its target is untouched. Readers never see a
    half-written image either. On an error the temporary file is removed and the name is left as it was.
    """
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.with_name(f".lrpcli-{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
