"""Weighted sampling without replacement (Gumbel-top-k), one Triton program per group.

Per group the kernel draws counter-based noise for all N items (the same splitmix64 values as
``rng.uniform_noise``, so kernel and reference pick the same items), forms the Gumbel
keys, finds the k-th largest key with a 32-step radix select on the keys' order-preserving integer image,
and writes the selected items' indices at their rank among the selected: the output comes
out ascending without a sort. Ties at the threshold (only possible with repeated keys, e.g.
zero weights) are broken by index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from umt_kernels import reference, rng
from umt_kernels._backend import use_triton
from umt_kernels.utils import block_size, num_warps_for


@triton.jit
def _sortable_bits(x):
    """float32 -> uint32 whose unsigned order is the float order (-inf and NaN included)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _topk_rank(keys, valid, k):
    """For one row of float32 ``keys``: (selected mask, 0-based rank among the selected)."""
    u = tl.where(valid, _sortable_bits(keys), 0)
    threshold = tl.zeros((), dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        candidate = threshold | (1 << bit)
        count = tl.sum(((u >= candidate) & valid).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    above = (u > threshold) & valid
    tied = (u == threshold) & valid
    room = k - tl.sum(above.to(tl.int32), axis=0)
    selected = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    rank = tl.cumsum(selected.to(tl.int32), axis=0) - 1
    return selected, rank


@triton.jit
def _uniform_noise(key, rows, cols, N):
    """splitmix64 of the counter row * N + col plus the key; top 24 bits as a float in [0, 1)."""
    z = (rows * N + cols).to(tl.uint64) * 0x9E3779B97F4A7C15 + key.to(tl.uint64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z >> 40).to(tl.float32) * 5.9604644775390625e-08  # 2 ** -24


MODES = {"weighted": 0, "uniform": 1, "topk": 2}  # the kernels' MODE constexpr


@triton.jit
def _sample_keys(w_ptr, stride_wn, row, cols, valid, N, key, MODE: tl.constexpr):
    """One row's keys: Gumbel keys log(w) - log(-log(u)) (weighted), the noise u itself
    (uniform) or the weights themselves (topk)."""
    if MODE == 2:
        keys = tl.load(w_ptr + cols * stride_wn, mask=valid, other=0.0).to(tl.float32)
    else:
        noise = _uniform_noise(key, row, cols, N)
        if MODE == 1:
            keys = noise
        else:
            w = tl.load(w_ptr + cols * stride_wn, mask=valid, other=1.0).to(tl.float32)
            keys = tl.log(w) - tl.log(-tl.log(tl.maximum(noise, 2.9802322387695312e-08)))  # 2 ** -25
    return keys


@triton.jit
def _load_key(key, key_ptr, KEY_IN_MEMORY: tl.constexpr):
    """The sampling key: the scalar argument, or (for a device-side offset) read from memory."""
    if KEY_IN_MEMORY:  # one return: the compiler types every return, even in a dead branch
        key = tl.load(key_ptr)
    return key


@triton.jit
def _sample_kernel(
    w_ptr, idx_ptr, N, k, stride_wg, stride_wn, key, key_ptr, row_offset,
    MODE: tl.constexpr, KEY_IN_MEMORY: tl.constexpr, BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    key = _load_key(key, key_ptr, KEY_IN_MEMORY)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < N
    keys = _sample_keys(w_ptr + group * stride_wg, stride_wn, row_offset + group, cols, valid, N, key, MODE)
    selected, rank = _topk_rank(keys, valid, k)
    tl.store(idx_ptr + group * k + rank, cols.to(tl.int64), mask=selected)


# A row's working set per item (noise, key, its integer image, masks, ranks): sizes the warps so
# that a 2048-wide row (the random policy's T * P) does not crowd 157 registers into 2 warps.
_VALUES_PER_ITEM = 8


def key_arguments(seed: int, offset: int, offset_tensor: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """(scalar key, key tensor) for a kernel launch: the key is mixed on the host from an int
    offset, or on the device from ``offset_tensor`` (then the scalar is unused)."""
    if offset_tensor is None:
        return rng.mix_seed(seed, offset), None
    return 0, rng.mix_seed_on_device(seed, offset_tensor).reshape(1)


def _launch_sample(
    weights_GN: torch.Tensor, k: int, seed: int, offset: int, offset_tensor: torch.Tensor | None, row_offset: int, mode: str
) -> torch.Tensor:
    G, N = weights_GN.shape
    idx = torch.empty(G, k, device=weights_GN.device, dtype=torch.int64)
    if G == 0:
        return idx
    key, key_tensor = key_arguments(seed, offset, offset_tensor)
    BLOCK_N = block_size(N)
    _sample_kernel[(G,)](
        weights_GN, idx, N, k, weights_GN.stride(0), weights_GN.stride(1), key,
        idx if key_tensor is None else key_tensor, row_offset,
        MODE=MODES[mode], KEY_IN_MEMORY=key_tensor is not None, BLOCK_N=BLOCK_N,
        num_warps=num_warps_for(_VALUES_PER_ITEM * BLOCK_N),
    )
    return idx


@torch.library.custom_op("umt_kernels::sample_without_replacement", mutates_args=())
def _sample_op(
    weights_GN: torch.Tensor, k: int, seed: int, offset: int, offset_tensor: torch.Tensor | None, row_offset: int, mode: str
) -> torch.Tensor:
    if use_triton(weights_GN):
        return _launch_sample(weights_GN, k, seed, offset, offset_tensor, row_offset, mode)
    return reference.sample_without_replacement(
        weights_GN, k, seed=seed, offset=offset if offset_tensor is None else offset_tensor, row_offset=row_offset, mode=mode
    )


@_sample_op.register_fake
def _(weights_GN, k, seed, offset, offset_tensor, row_offset, mode):
    return weights_GN.new_empty((weights_GN.shape[0], k), dtype=torch.int64)


def split_offset(offset: int | torch.Tensor, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """An op's ``offset`` argument as (int, None) or (0, 0-dim int64 tensor on ``device``)."""
    if not isinstance(offset, torch.Tensor):
        return int(offset), None
    if offset.dim() != 0 or offset.dtype != torch.int64 or offset.device != device:
        raise ValueError(
            f"a tensor offset must be a 0-dim int64 tensor on {device}, got {offset.dtype} of shape "
            f"{tuple(offset.shape)} on {offset.device}"
        )
    return 0, offset


def sample_without_replacement(
    weights_GN: torch.Tensor,
    k: int,
    *,
    seed: int,
    offset: int | torch.Tensor = 0,
    row_offset: int = 0,
    mode: str = "weighted",
) -> torch.Tensor:
    """Draws k of N items per group without replacement (Gumbel-top-k); sorted indices.

    Args:
        weights_GN: [G, N] fp32/bf16/fp16, non-negative, any strides. Zero-weight items are
            drawn only when fewer than k items have positive weight. Unused in ``uniform`` mode
            (only its shape and device matter); any real values in ``topk`` mode.
        k: items per group, 1 <= k <= N.
        seed, offset: the same (seed, offset) gives the same draw, with no host sync and no
            generator state. The training loop passes (run seed, step). ``offset`` is a Python
            int, or a 0-dim int64 tensor on the weights' device: then it is read on the device
            when the op runs, so a captured CUDA graph draws anew on each replay after the
            tensor is updated in place (e.g. ``step_counter.fill_(step)``). Both forms draw
            identically for equal values.
        row_offset: the global index of row 0 when ``weights_GN`` is a slice of a larger
            batch: the draw of a row depends on (seed, offset, row_offset + g) only, so a batch
            split over ranks or micro-batches draws exactly what the whole batch draws.
        mode: ``weighted`` (probability proportional to the weights), ``uniform``, or
            ``topk`` (no randomness: the k largest weights, equal weights taken in index
            order; seed and offset are ignored).

    Returns:
        [G, k] int64, strictly ascending per row. Not differentiable. The Triton kernel and
        the reference return identical indices (same counter-based noise, ties by index).
    """
    reference.check_sampling_args(weights_GN, k, mode)
    offset, offset_tensor = split_offset(offset, weights_GN.device)
    return _sample_op(weights_GN, k, seed, offset, offset_tensor, row_offset, mode)
