"""Figures without a display: matplotlib's Agg canvas, rendered to RGB arrays and PNG files.

pyplot is never imported, so no GUI backend is ever chosen and figures are freed with their
last reference (no global figure registry to leak into during a long run).
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
_COMPACT_STEP = 8  # 5 bits per channel


def new_figure(width_px: int, height_px: int, *, constrained: bool = False) -> Figure:
    """An empty figure of exactly width_px x height_px pixels on an Agg canvas."""
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def render_rgb(fig: Figure) -> np.ndarray:
    """Draw ``fig``; returns its pixels, uint8 [H, W, 3]."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg), "figures must come from new_figure"
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(image_HWC: np.ndarray, path: str, *, compact: bool = False) -> str:
    """Write uint8 [H, W, 3] as a PNG at ``path`` (atomically; parent folders are created).

    Args:
        compact: keep 5 bits per channel (32 levels, white stays white): about half the size,
            for pictures that are committed. Unlike a 256-colour palette it cannot turn one
            colour of a colour map into another.

    Returns:
        ``path``.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    image_HWC = np.ascontiguousarray(image_HWC, dtype=np.uint8)
    if compact:
        image_HWC = np.where(image_HWC == 255, 255, image_HWC // _COMPACT_STEP * _COMPACT_STEP + _COMPACT_STEP // 2)
    tmp = f"{path}.tmp"
    Image.fromarray(image_HWC.astype(np.uint8), mode="RGB").save(tmp, format="PNG", compress_level=9 if compact else 6)
    os.replace(tmp, path)
    return path


def save_figure(fig: Figure, path: str, *, compact: bool = False) -> np.ndarray:
    """Render ``fig`` once, write it to ``path`` as a PNG, and return the pixels [H, W, 3]."""
    image_HWC = render_rgb(fig)
    save_png(image_HWC, path, compact=compact)
    return image_HWC
