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


def save_png(image_HWC: np.ndarray, path: str, *, palette: bool = False) -> str:
    """Write uint8 [H, W, 3] as a PNG at ``path`` (atomically; parent folders are created).

    Args:
        palette: quantise to 256 colours first: about 3x smaller files, for pictures that are
            committed (README images); figures of mostly flat colour lose nothing visible.

    Returns:
        ``path``.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(image_HWC, dtype=np.uint8), mode="RGB")
    if palette:
        image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = f"{path}.tmp"
    image.save(tmp, format="PNG", compress_level=6)
    os.replace(tmp, path)
    return path


def save_figure(fig: Figure, path: str, *, palette: bool = False) -> np.ndarray:
    """Render ``fig`` once, write it to ``path`` as a PNG, and return the pixels [H, W, 3]."""
    image_HWC = render_rgb(fig)
    save_png(image_HWC, path, palette=palette)
    return image_HWC
