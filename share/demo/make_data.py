"""Deterministic generator for the lrpcli demo data set: coloured shapes on textured backgrounds.

Each image is 64x64 RGB and holds one shape (circle, cross, square or triangle) of random size (15-30 % of the
image area), position, rotation and colour, drawn over a noisy multi-colour background made of a colour
gradient, sinusoidal stripes and soft blobs. Shape colours are drawn from one distribution for every class,
so colour does not give the class away. Beside every image a binary object mask is produced.

A planted "Clever Hans" shortcut: a fixed fraction (``WATERMARK_FRACTION``, 3/8) of the ``triangle`` images,
and no image of another class, carry a small copyright-like tag in the bottom-left corner (a light 13 x 7 box
with dark "LRP" letters, ``paste_watermark``). A model trained on this data learns to take the tag as evidence
for "triangle", and SpRAy finds the tagged triangles as their own cluster. Object masks never include the tag.
The shipped set holds three times as many triangles as images of each other class (``--tagged-class-factor``),
so that the triangle class has enough samples for the clustering.

Command line (writes an ImageFolder tree plus a parallel tree of masks)::

    python share/demo/make_data.py OUT_DIR --per-class 16 --seed 1234    # 48 triangles, 18 of them tagged

    OUT_DIR/images/<class>/<class>_0000.png   RGB
    OUT_DIR/masks/<class>/<class>_0000.png    mode 'L', 0 = background, 255 = object
    OUT_DIR/watermarked.txt                   the tagged images, one relative path a line

``--watermark-fraction 0`` writes the data without the tag.

Importable: ``generate(n_per_class, seed)`` yields ``(class_index, class_name, PIL image, mask)`` in memory;
``is_watermarked(class_name, i)`` tells which of them carry the tag.
Only numpy and Pillow are used; the same (n_per_class, seed) always gives the same pixels.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# alphabetical, so that the class index equals the sorted-folder label lrpcli (ImageFolder) assigns
CLASSES = ("circle", "cross", "square", "triangle")
SIZE = 64
_SS = 4  # supersampling factor for anti-aliased shape edges
AREA_RANGE = (0.15, 0.30)  # shape area as a fraction of the image area

WATERMARK_CLASS = "triangle"
WATERMARK_FRACTION = 0.375
MANIFEST = "watermarked.txt"
# the tag's dark "letters" L, R, P (5 x 11), drawn inside a 7 x 13 light box with a 1-pixel border
_GLYPHS = np.array([[c == "#" for c in row] for row in (
    "#...##..##.",
    "#...#.#.#.#",
    "#...##..##.",
    "#...#.#.#..",
    "###.#.#.#..",
)])
TAG_HEIGHT, TAG_WIDTH = _GLYPHS.shape[0] + 2, _GLYPHS.shape[1] + 2
TAG_TOP, TAG_LEFT = SIZE - 1 - TAG_HEIGHT, 1  # bottom-left corner, one pixel in from the edges
_TAG_LIGHT = np.array([245, 240, 225], dtype=np.uint8)
_TAG_DARK = np.array([25, 25, 35], dtype=np.uint8)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A float32 (H, W, 3) background in [0, 1]: gradient + stripes + soft blobs + pixel noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)

    # colour gradient between two random colours in a random direction
    c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = (math.cos(ang) * (xx - 0.5) + math.sin(ang) * (yy - 0.5)) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t

    # one or two sets of sinusoidal stripes of random period, orientation and colour
    for _ in range(rng.integers(1, 3)):
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        period = rng.uniform(5.0, 16.0) / SIZE
        ang = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        s = np.sin(2 * math.pi * (math.cos(ang) * xx + math.sin(ang) * yy) / period + phase)
        alpha = rng.uniform(0.25, 0.6) * (0.5 + 0.5 * s)[..., None]
        img = img * (1 - alpha) + colour * alpha

    # soft gaussian blobs
    for _ in range(rng.integers(3, 7)):
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        cx, cy = rng.uniform(-0.1, 1.1, size=2)
        sx, sy = rng.uniform(0.05, 0.2, size=2)
        g = np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
        alpha = rng.uniform(0.4, 0.9) * g[..., None]
        img = img * (1 - alpha) + colour * alpha

    img = img + rng.normal(0.0, 0.04, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _shape_points(name: str, area: float, angle: float) -> np.ndarray | float:
    """Polygon vertices centred on the origin (or the radius, for a circle) with the given area in pixels."""
    if name == "circle":
        return math.sqrt(area / math.pi)
    if name == "square":
        h = math.sqrt(area) / 2
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif name == "triangle":
        a = math.sqrt(4 * area / math.sqrt(3))  # equilateral, side a
        r = a / math.sqrt(3)  # circumradius
        pts = np.array([[r * math.cos(t), r * math.sin(t)] for t in (-math.pi / 2 + k * 2 * math.pi / 3
                                                                       for k in range(3))])
    elif name == "cross":
        # plus sign of arm length L and arm width w = L/3: area = 2Lw - w^2 = 5 L^2 / 9
        L = math.sqrt(9 * area / 5)
        a, b = L / 2, L / 6
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                        [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    else:
        raise ValueError(f"unknown shape {name!r}")
    return _rotate(pts, angle)


def _shape_alpha(name: str, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of one randomly sized, placed and rotated shape."""
    area = rng.uniform(*AREA_RANGE) * SIZE * SIZE
    angle = rng.uniform(0, 2 * math.pi)
    geom = _shape_points(name, area, angle)
    margin = 1.0
    if isinstance(geom, float):
        lo = np.array([-geom, -geom])
        hi = -lo
    else:
        lo, hi = geom.min(axis=0), geom.max(axis=0)
    cx = rng.uniform(margin - lo[0], SIZE - margin - hi[0])
    cy = rng.uniform(margin - lo[1], SIZE - margin - hi[1])

    canvas = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    draw = ImageDraw.Draw(canvas)
    if isinstance(geom, float):
        box = [(cx - geom) * _SS, (cy - geom) * _SS, (cx + geom) * _SS, (cy + geom) * _SS]
        draw.ellipse(box, fill=255)
    else:
        pts = (geom + np.array([cx, cy])) * _SS
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    small = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _shape_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour (one distribution for all classes) that stands out from the background under it."""
    colour = rng.uniform(0.0, 1.0, size=3)
    for _ in range(50):
        if np.linalg.norm(colour - under) >= 0.45:
            break
        colour = rng.uniform(0.0, 1.0, size=3)
    return colour.astype(np.float32)


def make_sample(class_index: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """One (RGB image, boolean mask) pair of class ``CLASSES[class_index]`` from ``rng``."""
    name = CLASSES[class_index]
    bg = _background(rng)
    alpha = _shape_alpha(name, rng)
    mask = alpha >= 0.5
    under = bg[mask].mean(axis=0)
    colour = _shape_colour(rng, under)
    # a lightly shaded, noisy fill so the object is not a flat colour either
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    ang = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0.0, 0.25) * (math.cos(ang) * (xx - 0.5) + math.sin(ang) * (yy - 0.5))
    fill = colour * shade[..., None] + rng.normal(0.0, 0.04, size=bg.shape).astype(np.float32)
    img = bg * (1 - alpha[..., None]) + np.clip(fill, 0, 1) * alpha[..., None]
    img8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(img8, mode="RGB"), mask


def tag_box() -> np.ndarray:
    """Boolean (H, W): the pixels the watermark tag covers."""
    box = np.zeros((SIZE, SIZE), dtype=bool)
    box[TAG_TOP: TAG_TOP + TAG_HEIGHT, TAG_LEFT: TAG_LEFT + TAG_WIDTH] = True
    return box


def paste_watermark(image: Image.Image, mask: np.ndarray | None = None) -> tuple[Image.Image, np.ndarray | None]:
    """The image with the tag drawn over its bottom-left corner, and the mask without the tag's pixels.

    Opaque and always the same pixels, so that it is a shortcut a model can pick up; it also works on
    images of other classes, to test whether a model uses it.
    """
    arr = np.array(image.convert("RGB"), dtype=np.uint8)
    tag = np.empty((TAG_HEIGHT, TAG_WIDTH, 3), dtype=np.uint8)
    tag[...] = _TAG_LIGHT
    tag[1:-1, 1:-1][_GLYPHS] = _TAG_DARK
    arr[TAG_TOP: TAG_TOP + TAG_HEIGHT, TAG_LEFT: TAG_LEFT + TAG_WIDTH] = tag
    return Image.fromarray(arr, mode="RGB"), (None if mask is None else mask & ~tag_box())


def is_watermarked(class_name: str, i: int, fraction: float = WATERMARK_FRACTION,
                   watermark_class: str = WATERMARK_CLASS) -> bool:
    """Whether sample ``i`` of ``class_name`` carries the tag: exactly ``floor(n * fraction)`` of the first n
    samples of ``watermark_class`` (evenly spread: i where ``floor((i + 1) f)`` steps up), none of another."""
    if class_name != watermark_class or fraction <= 0:
        return False
    return math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)


def sample(class_index: int, i: int, seed: int, watermark_fraction: float = WATERMARK_FRACTION,
           watermark_class: str = WATERMARK_CLASS) -> tuple[Image.Image, np.ndarray]:
    """Sample ``i`` of class ``class_index``: depends only on (seed, class, i) and whether it carries the tag."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, class_index, i]))
    img, mask = make_sample(class_index, rng)
    if is_watermarked(CLASSES[class_index], i, watermark_fraction, watermark_class):
        img, mask = paste_watermark(img, mask)
    return img, mask


def generate(n_per_class: int, seed: int, watermark_fraction: float = WATERMARK_FRACTION,
             watermark_class: str = WATERMARK_CLASS) -> Iterator[tuple[int, str, Image.Image, np.ndarray]]:
    """Yield ``(class_index, class_name, image, mask)`` for ``n_per_class`` images of each class.

    Samples are interleaved by class (i = 0 of every class, then i = 1, ...). Sample (class c, index i)
    depends only on (seed, c, i), so a larger ``n_per_class`` extends a smaller one keeping its images.
    The tagged samples (``is_watermarked``) are the untagged ones with the tag pasted on; fraction 0 tags none.
    """
    for i in range(n_per_class):
        for c, name in enumerate(CLASSES):
            img, mask = sample(c, i, seed, watermark_fraction, watermark_class)
            yield c, name, img, mask


def file_name(class_name: str, i: int) -> str:
    return f"{class_name}_{i:04d}.png"


def write(out_dir: str | Path, n_per_class: int, seed: int, watermark_fraction: float = WATERMARK_FRACTION,
          tagged_class_factor: int = 3) -> int:
    """Write images, masks and the manifest of tagged images under ``out_dir``; returns the number of images.

    The watermark class gets ``tagged_class_factor`` times ``n_per_class`` images (its first ``n_per_class``
    are those of a balanced set), so that SpRAy has enough of its samples to find the tagged group.
    """
    out = Path(out_dir)
    counts = {name: n_per_class * (tagged_class_factor if name == WATERMARK_CLASS else 1) for name in CLASSES}
    n, tagged = 0, []
    for c, name in enumerate(CLASSES):
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            img, mask = sample(c, i, seed, watermark_fraction)
            fn = file_name(name, i)
            img.save(out / "images" / name / fn, optimize=True)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(out / "masks" / name / fn, optimize=True)
            if is_watermarked(name, i, watermark_fraction):
                tagged.append(f"{name}/{fn}")
            n += 1
    (out / MANIFEST).write_text("".join(f"{t}\n" for t in tagged))
    return n


def read_manifest(folder: str | Path) -> set[str]:
    """The tagged images listed in ``folder/watermarked.txt`` (relative paths, as lrpcli stores ``filename``)."""
    return {line.strip() for line in (Path(folder) / MANIFEST).read_text().splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder to write images/ and masks/ into")
    p.add_argument("--per-class", type=int, default=16, help="images per class (default 16)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (default 1234, the shipped demo set)")
    p.add_argument("--watermark-fraction", type=float, default=WATERMARK_FRACTION,
                   help=f"share of {WATERMARK_CLASS} images carrying the tag (default {WATERMARK_FRACTION}; 0: none)")
    p.add_argument("--tagged-class-factor", type=int, default=3,
                   help=f"{WATERMARK_CLASS} gets this many times --per-class images (default 3, the shipped set)")
    args = p.parse_args(argv)
    if not 0.0 <= args.watermark_fraction <= 1.0:
        p.error(f"--watermark-fraction {args.watermark_fraction}: expected a number from 0 to 1")
    if args.tagged_class_factor < 1:
        p.error(f"--tagged-class-factor {args.tagged_class_factor}: expected an integer of at least 1")
    n = write(args.out_dir, args.per_class, args.seed, args.watermark_fraction, args.tagged_class_factor)
    print(f"wrote {n} images and masks under {args.out_dir}")


if __name__ == "__main__":
    main()
