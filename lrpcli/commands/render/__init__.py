"""Heatmap images from stored relevances (``lrpcli render``), and a small Python API for the same pixels.

Nothing here imports torch: rendering needs numpy, Pillow and h5py only, so it starts fast. Imports are
deferred so that ``lrpcli --help`` does not pay for numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["palette", "render_heatmap"]


def palette(name_or_spec: str) -> np.ndarray:
    """The ``(256, 3)`` uint8 colour table of a named palette or of a spec like ``0ff,00f,80:000,f00,fff``."""
    from lrpcli.commands.render.palettes import palette as _palette  # lazy: keeps lrpcli --help fast

    return _palette(name_or_spec)


def render_heatmap(
    relevance: np.ndarray,
    cmap: str = "coldnhot",
    norm: str = "symmetric",
    level: float = 1.0,
    clip: float | None = None,
) -> np.ndarray:
    """Colour one relevance map, ``(C, H, W)`` (channels summed) or ``(H, W)``, as uint8 ``(H, W, 3)``.

    Same formulas as the CLI (see ``lrpcli.commands.render.normalize``): under ``symmetric`` zero gets the palette's
    centre entry (index 128), ``+max|R|`` the last entry and ``-max|R|`` the first.
    """
    import numpy as np

    from lrpcli.commands.render.normalize import to_index  # lazy: keeps lrpcli --help fast
    from lrpcli.commands.render.palettes import palette as _palette  # lazy: keeps lrpcli --help fast

    arr = np.asarray(relevance)
    if arr.ndim == 3:
        arr = arr.sum(axis=0, dtype=np.float32)
    elif arr.ndim != 2:
        raise ValueError(f"relevance must be (C, H, W) or (H, W), got shape {arr.shape}")
    return _palette(cmap)[to_index(arr, norm, level, clip)]
