"""Normalisation to palette indices and the render_heatmap API: exact pixel values."""

from __future__ import annotations

import numpy as np
import pytest

from lrpcli.commands.render import palette, render_heatmap
from lrpcli.commands.render.normalize import magnitude, to_index
from lrpcli.errors import DataError

RAMP = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]], dtype=np.float32)


def test_symmetric() -> None:
    # (v + 1) / 2 * 255 rounded half up, v = x / max|x|
    assert to_index(RAMP).tolist() == [[0, 64, 128, 191, 255]]


def test_absolute() -> None:
    assert to_index(RAMP, "absolute").tolist() == [[255, 128, 0, 128, 255]]


def test_unaligned() -> None:
    assert to_index(RAMP + 10, "unaligned").tolist() == [[0, 64, 128, 191, 255]]
    assert to_index(np.array([[1.0, 2.0, 5.0]]), "unaligned").tolist() == [[0, 64, 255]]


def test_level_saturates() -> None:
    assert to_index(RAMP, level=2.0).tolist() == [[0, 0, 128, 255, 255]]
    assert to_index(RAMP, level=0.5).tolist() == [[64, 96, 128, 159, 191]]
    assert to_index(RAMP + 2, "unaligned", level=2.0).tolist() == [[0, 128, 255, 255, 255]]


def test_per_sample_scale() -> None:
    batch = np.stack([RAMP, RAMP * 1000])
    out = to_index(batch)
    assert out.shape == (2, 1, 5)
    assert np.array_equal(out[0], out[1])


def test_percentile_clip() -> None:
    x = np.arange(101, dtype=np.float32)[None]  # 0..100; |x| 50th percentile = 50
    out = to_index(x, clip=50)
    assert out[0, 25] == 191 and out[0, 50] == 255 and out[0, 100] == 255 and out[0, 0] == 128
    lo_hi = to_index(x, "unaligned", clip=90)  # lo = 10, hi = 90
    assert lo_hi[0, :11].tolist() == [0] * 11 and lo_hi[0, 50] == 128 and lo_hi[0, 90:].tolist() == [255] * 11


def test_constant_and_non_finite() -> None:
    zero = np.zeros((2, 3), dtype=np.float32)
    assert np.all(to_index(zero) == 128)
    assert np.all(to_index(zero, "absolute") == 0)
    assert np.all(to_index(zero + 5, "unaligned") == 0)
    x = np.array([[np.nan, np.inf, -np.inf, 1.0, -2.0]], dtype=np.float32)
    assert to_index(x).tolist() == [[128, 255, 0, 191, 0]]


def test_input_not_modified_and_float16() -> None:
    x = RAMP.copy()
    to_index(x)
    to_index(x, "unaligned")
    assert np.array_equal(x, RAMP)
    assert to_index(RAMP.astype(np.float16)).tolist() == [[0, 64, 128, 191, 255]]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"norm": "log"}, "--norm 'log'"), ({"level": 0}, "--level 0"), ({"level": float("nan")}, "--level nan"),
     ({"clip": 0}, "--clip 0"), ({"clip": 100.5}, "--clip 100.5")],
)
def test_bad_parameters(kwargs: dict, needle: str) -> None:
    with pytest.raises(DataError, match=needle.replace("(", r"\(")):
        to_index(RAMP, **kwargs)


def test_render_heatmap_exact_colours() -> None:
    rel = np.zeros((3, 2, 3), dtype=np.float32)
    rel[0, 0, 0] = 4.0  # max
    rel[1, 0, 1] = -4.0  # min
    rel[2, 0, 2] = 2.0  # half of max
    rel[0, 1, 0], rel[1, 1, 0] = 3.0, -3.0  # channels cancel: zero
    rgb = render_heatmap(rel, cmap="bwr")
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0]  # last stop
    assert rgb[0, 1].tolist() == [0, 0, 255]  # first stop
    assert rgb[1, 0].tolist() == [255, 255, 255]  # zero: the centre
    assert rgb[0, 2].tolist() == palette("bwr")[191].tolist()  # 0.5 -> index 191
    # white -> red, 63/127 of the way: 255 - 255 * 63 / 127 = 128.504 -> 129
    assert palette("bwr")[191].tolist() == [255, 129, 129]
    hot = render_heatmap(rel, cmap="coldnhot")
    assert hot[1, 0].tolist() == [0, 0, 0] and hot[0, 0].tolist() == [255, 255, 255]
    gray = render_heatmap(rel[2], cmap="gray", norm="absolute")
    assert gray[0, 2].tolist() == [255, 255, 255] and gray[1, 1].tolist() == [0, 0, 0]


def test_render_heatmap_custom_spec_and_shape_error() -> None:
    rgb = render_heatmap(RAMP, cmap="00f,80:000,f00")
    assert rgb[0].tolist() == [[0, 0, 255], [0, 0, 128], [0, 0, 0], [126, 0, 0], [255, 0, 0]]
    with pytest.raises(ValueError):
        render_heatmap(np.zeros(5))


def test_magnitude_is_the_overlay_weight() -> None:
    x = np.array([[0.0, 2.0], [-4.0, 1.0]], dtype=np.float32)
    assert magnitude(x).tolist() == [[0.0, 0.5], [1.0, 0.25]]
    assert magnitude(x, level=2.0).tolist() == [[0.0, 1.0], [1.0, 0.5]]
    assert magnitude(x[None], clip=50).shape == (1, 2, 2)
    # per sample, as the colours: the second map's own max sets its scale
    batch = np.stack([x, x / 4])
    assert np.array_equal(magnitude(batch)[1], magnitude(x))
    odd = np.array([[np.nan, np.inf], [-2.0, 0.0]], dtype=np.float32)
    assert magnitude(odd).tolist() == [[0.0, 1.0], [1.0, 0.0]]  # NaN weighs 0, infinity saturates
    assert magnitude(np.zeros((2, 2), dtype=np.float32)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    # the weight is what --norm absolute turns into an index
    assert np.array_equal(np.floor(magnitude(RAMP) * 255 + 0.5).astype(np.uint8), to_index(RAMP, "absolute"))
