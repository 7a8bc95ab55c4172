"""Launch heuristics shared by the kernels (block sizes, warps)."""
from __future__ import annotations

import triton


def block_size(n: int, minimum: int = 16) -> int:
    """Power of two >= n (and >= ``minimum``): one tile spans a whole row."""
    return max(minimum, triton.next_power_of_2(n))


def num_warps_for(tile_elements: int) -> int:
    """Warps for a program that holds ``tile_elements`` values in registers."""
    if tile_elements >= 16384:
        return 8
    if tile_elements >= 4096:
        return 4
    return 2
