"""How much of the positive relevance lies on the object: helpers for the demo's object masks.

``share/demo/masks/<class>/<file>.png`` holds, for every image ``share/demo/images/<class>/<file>.png``, a
binary object mask (mode 'L', 0 = background, 255 = object).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def load_masks(masks_dir: str | Path, filenames: Iterable[str | bytes], size: tuple[int, int] | None = None
               ) -> np.ndarray:
    """Boolean masks ``N x H x W`` for image file names relative to the images folder
    (``circle/circle_0003.png``).

    ``filenames`` may be ``str`` or ``bytes`` (as h5py returns the ``filename`` dataset). ``size`` = (H, W)
    resizes each mask with nearest-neighbour sampling when the relevance maps have another resolution.
    """
    root = Path(masks_dir)
    out = []
    for name in filenames:
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        with Image.open(root / name) as im:
            im = im.convert("L")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
            out.append(np.asarray(im) > 127)
    if not out:
        h, w = size if size is not None else (0, 0)
        return np.zeros((0, h, w), dtype=bool)
    return np.stack(out)


def mask_share(relevance: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per sample, the share of positive relevance that falls inside the mask, in [0, 1].

    ``relevance`` is ``N x C x H x W`` (channels are summed first) or ``N x H x W``; ``masks`` is boolean
    ``N x H x W``. A sample without any positive relevance gets NaN.
    """
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 4:
        r = r.sum(axis=1)
    if r.ndim != 3:
        raise ValueError(f"relevance must be N x C x H x W or N x H x W, got shape {r.shape}")
    m = np.asarray(masks, dtype=bool)
    if m.shape != r.shape:
        raise ValueError(f"masks shape {m.shape} does not match relevance shape {r.shape}")
    pos = np.clip(r, 0.0, None)
    total = pos.sum(axis=(1, 2))
    inside = (pos * m).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def mask_area_share(masks: np.ndarray) -> np.ndarray:
    """Per sample, the fraction of pixels inside the mask: the share a relevance spread evenly would get."""
    m = np.asarray(masks, dtype=bool)
    return m.reshape(len(m), -1).mean(axis=1)
