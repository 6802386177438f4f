"""Pixels: overlay arithmetic, grid geometry and content, resizing, encoding round trips, swatches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrpcli.commands.render import palette
from lrpcli.commands.render.images import (
    GRID_BACKGROUND,
    colorize,
    grid,
    grid_geometry,
    label_height,
    overlay,
    resize_maps,
    save,
    swatches,
)


def test_overlay_arithmetic() -> None:
    heat = np.array([[[255, 0, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    image = np.array([[[200, 200, 200], [0, 100, 255], [255, 255, 255]]], dtype=np.uint8)
    out = overlay(heat, image, 0.25)
    assert out.dtype == np.uint8
    # 0.25 * 255 + 0.75 * 200 = 213.75 -> 214; 0.75 * 200 = 150
    assert out[0, 0].tolist() == [214, 150, 150]
    assert out[0, 1].tolist() == [0, 75, 255]
    expected = np.floor(0.25 * heat.astype(np.float64) + 0.75 * image + 0.5)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert np.array_equal(overlay(heat, image, 0.0), image)
    assert np.array_equal(overlay(heat, image, 1.0), heat)


def test_overlay_per_pixel_alpha() -> None:
    heat = np.array([[[[255, 0, 0], [0, 0, 255], [10, 20, 30]]]], dtype=np.uint8)  # (N=1, H=1, W=3, 3)
    image = np.array([[[[200, 200, 200], [0, 100, 255], [255, 255, 255]]]], dtype=np.uint8)
    alpha = np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32)  # (N, H, W)
    out = overlay(heat, image, alpha)
    assert out[0, 0, 0].tolist() == [200, 200, 200]  # alpha 0: the image exactly
    assert out[0, 0, 1].tolist() == [0, 50, 255]  # (0 + 0 + 1) // 2, (0 + 100 + 1) // 2, (255 + 255 + 1) // 2
    assert out[0, 0, 2].tolist() == [10, 20, 30]  # alpha 1: the heatmap exactly
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    hot = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    assert np.array_equal(overlay(hot, img, np.zeros((2, 5, 7), np.float32)), img)


def test_overlay_random_batch_within_rounding() -> None:
    rng = np.random.default_rng(1)
    heat = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    for alpha in (0.1, 0.5, 0.9):
        exact = alpha * heat.astype(np.float64) + (1 - alpha) * image.astype(np.float64)
        assert np.abs(overlay(heat, image, alpha) - exact).max() <= 0.5 + 1e-4


@pytest.mark.parametrize(("n", "columns", "cols", "rows"), [(10, None, 4, 3), (10, 5, 5, 2), (1, None, 1, 1),
                                                            (3, 10, 3, 1), (16, None, 4, 4)])
def test_grid_geometry(n: int, columns: int | None, cols: int, rows: int) -> None:
    geo = grid_geometry(n, 8, 6, columns)
    lh = label_height()
    assert (geo.columns, geo.rows) == (cols, rows)
    assert geo.size == (rows * (8 + lh) + (rows + 1) * geo.pad, cols * 6 + (cols + 1) * geo.pad)


def test_grid_content_and_labels() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 200, (5, 20, 30, 3), dtype=np.uint8)
    out = grid(tiles, [f"tile {k}" for k in range(5)])
    geo = grid_geometry(5, 20, 30)
    assert out.shape == (*geo.size, 3) and (geo.columns, geo.rows) == (3, 2)
    for k in range(5):
        y, x = geo.origin(k)
        assert np.array_equal(out[y : y + 20, x : x + 30], tiles[k])
        strip = out[y + 20 : y + 20 + geo.label_h, x : x + 30]
        assert (strip.min(axis=-1) < 128).sum() > 5  # text drawn under every tile
    y, x = geo.origin(5)  # the empty cell stays background, label strip included
    empty = out[y : y + 20 + geo.label_h, x : x + 30]
    assert np.all(empty == np.array(GRID_BACKGROUND, dtype=np.uint8))
    assert np.all(out[: geo.pad] == 255)  # padding


def test_resize_nearest_and_bilinear() -> None:
    maps = np.array([[[1.0, 2.0], [3.0, 4.0]]], dtype=np.float32)
    near = resize_maps(maps, (4, 4), "nearest")
    assert near[0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    bil = resize_maps(maps, (4, 6), "bilinear")
    assert bil.shape == (1, 4, 6) and bil.min() >= 1.0 and bil.max() <= 4.0
    assert resize_maps(maps, (2, 2)) is maps


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_save_round_trip(tmp_path: Path, fmt: str) -> None:
    lut = palette("coldnhot")
    idx = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / f"x.{fmt}"
    save(idx, path, fmt, lut)
    back = np.asarray(Image.open(path).convert("RGB"))
    if fmt == "png":  # palette PNG: exact colours
        assert Image.open(path).mode == "P"
        assert np.array_equal(back, colorize(idx, lut))
    else:
        assert back.shape == (16, 16, 3)
    rgb = colorize(idx, lut)
    save(rgb, tmp_path / f"y.{fmt}", fmt)
    if fmt == "png":
        assert np.array_equal(np.asarray(Image.open(tmp_path / "y.png")), rgb)


def test_swatches_strip() -> None:
    luts = {"gray": palette("gray"), "bwr": palette("bwr")}
    img = swatches(luts, height=10, name_w=50)
    assert img.shape == (2 * 12 + 2, 50 + 256 + 2, 3)
    assert np.array_equal(img[2, 50:306], palette("gray"))
    assert np.array_equal(img[14, 50:306], palette("bwr"))
