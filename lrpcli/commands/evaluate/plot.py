"""``--plot``: the mean MoRF (solid) and LeRF (dashed) curves of every file in one PNG, drawn with Pillow.

The top panel averages over all compared samples; below it, one small panel per target class (at most
``MAX_CLASSES``) shows the same curves over that class's samples. Nothing beyond Pillow is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lrpcli.commands.evaluate.run import FileResult
from lrpcli.errors import DataError

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (227, 119, 194), (140, 86, 75)]
GREY = (128, 128, 128)
MAX_CLASSES = 8
WIDTH, MAIN_H, SMALL_H = 900, 420, 200


def _series(results: list[FileResult], summary: dict[str, Any], baseline: bool,
            pick: np.ndarray | None) -> list[tuple[str, tuple[int, int, int], np.ndarray, np.ndarray]]:
    """(label, colour, mean MoRF, mean LeRF) per column over the compared rows (``pick`` selects of those)."""
    out = []
    for k, (col, res, rows) in enumerate(zip(summary["columns"], results, summary["row_numbers"])):
        rows = np.asarray(rows, dtype=np.int64)
        sel = rows if pick is None else rows[pick]
        c = res.curves["attribution"]
        out.append((col, COLOURS[k % len(COLOURS)], np.nanmean(c["morf"][sel], 0), np.nanmean(c["lerf"][sel], 0)))
    if baseline:
        rows = np.asarray(summary["row_numbers"][0], dtype=np.int64)
        sel = rows if pick is None else rows[pick]
        c = results[0].curves["random"]
        out.append(("random", GREY, np.nanmean(c["morf"][sel], 0), np.nanmean(c["lerf"][sel], 0)))
    return out


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple, width: int,
            dash: float = 7.0) -> None:
    """A polyline drawn as dashes of ``dash`` pixels, continuing across its vertices."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = float(np.hypot(x1 - x0, y1 - y0))
        pos = 0.0
        while pos < length:
            step = min(left, length - pos)
            if on:
                a, b = pos / length, (pos + step) / length
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=colour, width=width)
            pos += step
            left -= step
            if left <= 1e-9:
                on, left = not on, dash


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: list, title: str, ylabel: str,
           font: Any, ticks: bool) -> None:
    """Axes with ticks, the curves and a title inside ``box`` (left, top, right, bottom)."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 56, top + 22, right - 10, bottom - 30
    values = np.concatenate([np.concatenate([m, le]) for _, _, m, le in series])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    steps = max(1, max(len(m) for _, _, m, _ in series) - 1)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, top + 4), title, fill=(0, 0, 0), font=font)
    for t in np.linspace(lo, hi, 5):
        y = y1 - (t - lo) / (hi - lo) * (y1 - y0)
        draw.line([(x0 - 4, y), (x0, y)], fill=(0, 0, 0))
        draw.text((left + 2, y - 6), f"{t:.3g}", fill=(0, 0, 0), font=font)
    for t in np.linspace(0, steps, min(steps, 4) + 1):
        x = x0 + t / steps * (x1 - x0)
        draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
        draw.text((x - 6, y1 + 6), f"{int(round(t))}", fill=(0, 0, 0), font=font)
    if ticks:
        draw.text(((x0 + x1) // 2 - 60, y1 + 17), "patches replaced", fill=(0, 0, 0), font=font)
        draw.text((x0 + 4, y0 + 4), ylabel, fill=(0, 0, 0), font=font)

    def points(curve: np.ndarray) -> list[tuple[float, float]]:
        return [(x0 + k / steps * (x1 - x0), y1 - (float(v) - lo) / (hi - lo) * (y1 - y0))
                for k, v in enumerate(curve) if np.isfinite(v)]

    for _, colour, morf, lerf in series:
        draw.line(points(morf), fill=colour, width=2)
        _dashed(draw, points(lerf), colour, 2)


def draw_curves(path: Path, results: list[FileResult], summary: dict[str, Any], *, score: str,
                baseline: bool) -> None:
    """Write the PNG: all samples on top with a legend, one panel per target class below."""
    font = ImageFont.load_default()
    targets = results[0].source.target[summary["row_numbers"][0]]
    classes = sorted(set(targets.tolist()))[:MAX_CLASSES]
    per_row = 4
    n_rows = -(-len(classes) // per_row) if len(classes) > 1 else 0
    legend_h = 18 * (len(summary["columns"]) + 1) + 10
    height = MAIN_H + legend_h + n_rows * SMALL_H
    im = Image.new("RGB", (WIDTH, height), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    ylabel = "target logit" if score == "logit" else "target probability"
    main = _series(results, summary, baseline, None)
    _panel(draw, (0, 0, WIDTH, MAIN_H), main, f"region perturbation, mean over {summary['rows']} samples: "
           "MoRF solid, LeRF dashed", ylabel, font, ticks=True)
    y = MAIN_H + 4
    for label, colour, _, _ in main:
        draw.line([(60, y + 7), (90, y + 7)], fill=colour, width=3)
        draw.text((98, y), label, fill=(0, 0, 0), font=font)
        y += 18
    top = MAIN_H + legend_h
    w = WIDTH // per_row
    for k, cls in enumerate(classes if n_rows else []):
        pick = np.flatnonzero(targets == cls)
        box = (k % per_row * w, top + k // per_row * SMALL_H, (k % per_row + 1) * w, top + (k // per_row + 1) * SMALL_H)
        _panel(draw, box, _series(results, summary, baseline, pick), f"target {cls} ({len(pick)})", ylabel, font,
               ticks=False)
    try:
        im.save(path, format="PNG")
    except OSError as err:
        raise DataError(f"--plot {path}: cannot write ({err.strerror or err})") from None
