"""Pictures of tokens on frames, as plain uint8 arrays (no axes, no figure).

Token index convention (as in umt_fast.masking): clip token ``t * P + p``, with patch
``p = row * grid + col`` of frame ``t`` and P = grid * grid. Every function here maps one
grid cell to one block of (H / grid) x (W / grid) pixels, so what a picture shows for a token
can be read back from its pixels (the tests do).
"""
from __future__ import annotations

import matplotlib
import numpy as np

MASKED_GREY = 150
"""Level that masked cells are pulled towards (with a trace of the frame's brightness)."""
KEPT_OUTLINE_RGB = (255, 221, 0)
"""Outline colour of a kept (visible) token."""
_GREY_MIX = 0.7  # share of MASKED_GREY in a masked pixel; the rest is the pixel's luma


def visible_token_grid(visible_idx_N: np.ndarray, num_frames: int, grid: int) -> np.ndarray:
    """Sorted clip token indices [N] -> kept-token map, bool [T, grid, grid]."""
    num_tokens = num_frames * grid * grid
    idx = np.asarray(visible_idx_N, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= num_tokens):
        raise ValueError(f"token indices must be in [0, {num_tokens}), got {idx.min()}..{idx.max()}")
    kept = np.zeros(num_tokens, dtype=bool)
    kept[idx] = True
    return kept.reshape(num_frames, grid, grid)


def upscale_nearest(image_HWC: np.ndarray, factor: int) -> np.ndarray:
    """Every pixel repeated ``factor`` x ``factor`` times: [H, W, C] -> [H*f, W*f, C]."""
    if factor == 1:
        return image_HWC
    return image_HWC.repeat(factor, axis=0).repeat(factor, axis=1)


def _cell_size(image_HWC: np.ndarray, grid: int) -> tuple[int, int]:
    H, W = image_HWC.shape[:2]
    if H % grid or W % grid:
        raise ValueError(f"a {H}x{W} frame does not split into a {grid}x{grid} token grid")
    return H // grid, W // grid


def _cells_to_pixels(cells_gg: np.ndarray, cell_h: int, cell_w: int) -> np.ndarray:
    """[g, g, ...] per-cell values -> [g*cell_h, g*cell_w, ...] blocks."""
    return cells_gg.repeat(cell_h, axis=0).repeat(cell_w, axis=1)


def luma(image_HWC: np.ndarray) -> np.ndarray:
    """ITU-R 601 brightness, float32 [H, W] in [0, 255]."""
    rgb = image_HWC.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def greyed(image_HWC: np.ndarray) -> np.ndarray:
    """The washed-out grey version of a frame that masked tokens show: uint8 [H, W, 3], R = G = B."""
    grey = _GREY_MIX * MASKED_GREY + (1 - _GREY_MIX) * luma(image_HWC)
    return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=2)


def _outline_width(cell_h: int) -> int:
    return max(1, cell_h // 14)


def cell_border_pixels(image_shape: tuple[int, ...], grid: int, width: int) -> np.ndarray:
    """bool [H, W]: the pixels within ``width`` of the edge of their grid cell."""
    H, W = image_shape[:2]
    cell_h, cell_w = H // grid, W // grid
    y, x = np.arange(H) % cell_h, np.arange(W) % cell_w
    border_y = (y < width) | (y >= cell_h - width)
    border_x = (x < width) | (x >= cell_w - width)
    return border_y[:, None] | border_x[None, :]


def mask_overlay(frame_HWC: np.ndarray, kept_gg: np.ndarray, outline_width: int | None = None) -> np.ndarray:
    """A frame as the student sees it: masked tokens greyed out, kept tokens outlined.

    Args:
        frame_HWC: uint8 [H, W, 3], H and W multiples of the grid.
        kept_gg: bool [grid, grid], True where the token is visible to the student.
        outline_width: pixels; default about 1/14 of a cell, at least 1.

    Returns:
        uint8 [H, W, 3]: kept cells keep their pixels inside a KEPT_OUTLINE_RGB border; masked
        cells are grey (R = G = B).
    """
    return _compose(frame_HWC, frame_HWC, kept_gg, outline_width)


def _compose(
    frame_HWC: np.ndarray, kept_look_HWC: np.ndarray, kept_gg: np.ndarray, outline_width: int | None = None
) -> np.ndarray:
    """Kept cells from ``kept_look_HWC`` inside an outline, masked cells greyed from ``frame_HWC``."""
    cell_h, cell_w = _cell_size(frame_HWC, kept_gg.shape[0])
    kept_HW = _cells_to_pixels(np.asarray(kept_gg, dtype=bool), cell_h, cell_w)
    out = np.where(kept_HW[..., None], kept_look_HWC, greyed(frame_HWC)).astype(np.uint8)
    width = outline_width or _outline_width(cell_h)
    outline_HW = kept_HW & cell_border_pixels(frame_HWC.shape, kept_gg.shape[0], width)
    out[outline_HW] = KEPT_OUTLINE_RGB
    return out


def _colours(values: np.ndarray, vmin: float, vmax: float, cmap: str) -> np.ndarray:
    """float values -> float32 RGB in [0, 255], [..., 3]."""
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax, clip=True)
    return (matplotlib.colormaps[cmap](norm(values))[..., :3] * 255).astype(np.float32)


def attention_heatmap(
    frame_HWC: np.ndarray, attn_gg: np.ndarray, *, vmax: float, cmap: str = "inferno", alpha: float = 0.75
) -> np.ndarray:
    """The teacher's attention over a frame: one flat colour block per token, blended over the
    frame's brightness so the scene stays recognisable.

    Args:
        frame_HWC: uint8 [H, W, 3].
        attn_gg: float [grid, grid], coloured on the scale [0, vmax].
        alpha: weight of the colour against the frame.

    Returns:
        uint8 [H, W, 3].
    """
    cell_h, cell_w = _cell_size(frame_HWC, attn_gg.shape[0])
    colour = _cells_to_pixels(_colours(attn_gg, 0.0, vmax, cmap), cell_h, cell_w)
    out = alpha * colour + (1 - alpha) * luma(frame_HWC)[..., None]
    return np.rint(out).clip(0, 255).astype(np.uint8)


def token_value_overlay(
    frame_HWC: np.ndarray,
    values_gg: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    cmap: str = "viridis",
    alpha: float = 0.6,
) -> np.ndarray:
    """A value per kept token (e.g. how well the student matches the teacher there).

    Args:
        values_gg: float [grid, grid]; NaN marks a masked token, drawn greyed out as in
            `mask_overlay`. Kept tokens are tinted with ``cmap`` on [vmin, vmax] and outlined.

    Returns:
        uint8 [H, W, 3].
    """
    kept_gg = ~np.isnan(values_gg)
    cell_h, cell_w = _cell_size(frame_HWC, values_gg.shape[0])
    colour = _cells_to_pixels(_colours(np.nan_to_num(values_gg, nan=vmin), vmin, vmax, cmap), cell_h, cell_w)
    tinted = np.rint(alpha * colour + (1 - alpha) * frame_HWC.astype(np.float32)).clip(0, 255).astype(np.uint8)
    return _compose(frame_HWC, tinted, kept_gg)
