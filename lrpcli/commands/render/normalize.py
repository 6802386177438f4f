"""Per-sample normalisation of relevance maps to palette indices, vectorised over a batch.

Input is a batch ``x`` of shape ``(N, H, W)`` (channels already summed). Each sample gets its own scale, so
one bright sample does not wash out the others. With ``s`` the per-sample scale, ``L`` the level:

- ``symmetric``: ``s = max|x|``; ``v = clip(x / (s / L), -1, 1)``; ``index = floor((v + 1) / 2 * 255 + 0.5)``.
  Zero lands on index 128, the centre of a signed palette; ``-s`` on 0 (first stop), ``+s`` on 255 (last).
- ``absolute``: ``s = max|x|``; ``v = clip(|x| / (s / L), 0, 1)``; ``index = floor(v * 255 + 0.5)``.
- ``unaligned``: min-max, ``v = clip((x - lo) / ((hi - lo) / L), 0, 1)`` with ``lo, hi`` the sample's min and
  max; ``index = floor(v * 255 + 0.5)``.

``L > 1`` saturates (the top ``1 - 1/L`` of the range hits the last colour), ``L < 1`` dims. With
``clip=P`` (a percentile, e.g. 99.5) ``max|x|`` becomes the P-th percentile of ``|x|`` (``hi``/``lo``: the
P-th and (100 - P)-th percentiles of ``x``), so a few extreme pixels of a heavy-tailed map do not squash the
rest.
An all-zero (constant) sample has no scale: it renders as index 128 (symmetric) or 0 (the others). NaN counts
as 0; infinities saturate and are left out of the scale.
"""

from __future__ import annotations

import numpy as np

from lrpcli.errors import DataError

NORMS = ("symmetric", "absolute", "unaligned")


def check(norm: str, level: float, clip: float | None) -> None:
    """Validate the parameters once, with messages that name the option and what is allowed."""
    if norm not in NORMS:
        raise DataError(f"--norm '{norm}': use one of {', '.join(NORMS)}")
    if not (np.isfinite(level) and level > 0):
        raise DataError(f"--level {level}: must be > 0 (1: the max gets the last colour; > 1 saturates)")
    if clip is not None and not (0 < clip <= 100):
        raise DataError(f"--clip {clip}: must be a percentile in (0, 100], e.g. 99.5")


def _per_sample(stat: np.ndarray) -> np.ndarray:
    """Reshape an ``(N,)`` statistic so it broadcasts over ``(N, H, W)``."""
    return stat.reshape(-1, 1, 1)


def _prepare(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """``x`` as float32 ``(N, H, W)`` with NaN as 0, the ``(N, H*W)`` values statistics are taken from
    (infinities as 0, so they saturate but do not set the scale), and whether ``x`` was one ``(H, W)`` map."""
    single = x.ndim == 2
    x = np.asarray(x, dtype=np.float32)
    if single:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected (N, H, W) or (H, W) relevance, got shape {x.shape}")
    flat = x.reshape(x.shape[0], -1)
    if bool(np.isfinite(flat).all()):
        return x, flat, single
    x = np.where(np.isnan(x), np.float32(0), x)
    flat = x.reshape(x.shape[0], -1)
    return x, np.where(np.isfinite(flat), flat, np.float32(0)), single


def _abs_scale(stats_src: np.ndarray, level: float, clip: float | None) -> np.ndarray:
    """Per-sample ``s / L`` with ``s = max|x|`` (or the ``clip`` percentile of ``|x|``); 1 where ``s`` is 0."""
    mag = np.abs(stats_src)
    scale = mag.max(axis=1) if clip is None else np.percentile(mag, clip, axis=1).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32) / np.float32(level)


def magnitude(x: np.ndarray, level: float = 1.0, clip: float | None = None) -> np.ndarray:
    """Per-pixel weight in [0, 1]: ``clip(|x| / (s / L), 0, 1)``, ``s`` as for ``absolute`` (any norm).

    Used as the relevance-weighted overlay alpha: zero relevance weighs 0, ``|x| >= s / L`` weighs 1. The
    value is the one ``absolute`` turns into an index, so weight and colour saturate together.
    """
    check("absolute", level, clip)
    x, stats_src, single = _prepare(x)
    v = np.abs(x) / _per_sample(_abs_scale(stats_src, level, clip))
    np.clip(v, 0, 1, out=v)
    return v[0] if single else v


def to_index(
    x: np.ndarray, norm: str = "symmetric", level: float = 1.0, clip: float | None = None
) -> np.ndarray:
    """Map a batch ``(N, H, W)`` (or one ``(H, W)`` map) of relevance to uint8 palette indices, per sample.

    Works in float32 for speed; the formulas are in the module docstring.
    """
    check(norm, level, clip)
    x, stats_src, single = _prepare(x)

    if norm == "unaligned":
        if clip is None:
            lo = stats_src.min(axis=1)
            hi = stats_src.max(axis=1)
        else:
            lo = np.percentile(stats_src, 100.0 - clip, axis=1).astype(np.float32)
            hi = np.percentile(stats_src, clip, axis=1).astype(np.float32)
        span = hi - lo
        const = span <= 0
        span = np.where(const, np.float32(1), span) / np.float32(level)
        v = (x - _per_sample(lo)) / _per_sample(span)
        if const.any():
            v[const] = 0
        np.clip(v, 0, 1, out=v)
        v *= 255
        v += 0.5
    else:
        scale = _abs_scale(stats_src, level, clip)
        if norm == "symmetric":
            v = x / _per_sample(scale)
            np.clip(v, -1, 1, out=v)
            # (v + 1) / 2 * 255 + 0.5 == v * 127.5 + 128, exact in float32 for v in {-1, 0, 1}
            v *= 127.5
            v += 128.0
        else:
            v = np.abs(x) / _per_sample(scale)
            np.clip(v, 0, 1, out=v)
            v *= 255
            v += 0.5
    # v >= 0.5 here, so truncation is floor: "round half up"
    idx = v.astype(np.uint8)
    return idx[0] if single else idx
