"""Weighted sampling without replacement (Gumbel-top-k), one Triton program per group.

Per group the kernel draws Philox noise for all N items, forms the Gumbel keys, finds the
k-th largest key with a 32-step radix select on the keys' order-preserving integer image,
and writes the selected items' indices at their rank among the selected: the output comes
out ascending without a sort. Ties at the threshold (only possible with repeated keys, e.g.
zero weights) are broken by index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from umt_kernels import reference
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
def _sample_keys(w_ptr, stride_wn, group, cols, valid, N, seed, UNIFORM: tl.constexpr):
    """Gumbel keys log(w) - log(-log(u)) (or u itself when UNIFORM) for one row."""
    noise = tl.rand(seed, group * N + cols)
    if UNIFORM:
        keys = noise
    else:
        w = tl.load(w_ptr + cols * stride_wn, mask=valid, other=1.0).to(tl.float32)
        keys = tl.log(w) - tl.log(-tl.log(tl.maximum(noise, 1e-20)))
    return keys


@triton.jit
def _sample_kernel(
    w_ptr, idx_ptr, N, k, stride_wg, stride_wn, seed,
    UNIFORM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < N
    keys = _sample_keys(w_ptr + group * stride_wg, stride_wn, group, cols, valid, N, seed, UNIFORM)
    selected, rank = _topk_rank(keys, valid, k)
    tl.store(idx_ptr + group * k + rank, cols.to(tl.int64), mask=selected)


@triton.jit
def _noise_kernel(out_ptr, N, seed, BLOCK_N: tl.constexpr):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    tl.store(out_ptr + group * N + cols, tl.rand(seed, group * N + cols), mask=cols < N)


def triton_uniform_noise(G: int, N: int, *, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """[G, N] float32: exactly the uniform noise the Triton sampler draws for (seed, offset)."""
    out = torch.empty(G, N, device=device, dtype=torch.float32)
    _noise_kernel[(G,)](out, N, reference.philox_seed(seed, offset), BLOCK_N=block_size(N))
    return out


def _launch_sample(weights_GN: torch.Tensor, k: int, seed: int, offset: int, uniform: bool) -> torch.Tensor:
    G, N = weights_GN.shape
    idx = torch.empty(G, k, device=weights_GN.device, dtype=torch.int64)
    if G == 0:
        return idx
    BLOCK_N = block_size(N)
    _sample_kernel[(G,)](
        weights_GN, idx, N, k, weights_GN.stride(0), weights_GN.stride(1), reference.philox_seed(seed, offset),
        UNIFORM=uniform, BLOCK_N=BLOCK_N, num_warps=num_warps_for(BLOCK_N),
    )
    return idx


@torch.library.custom_op("umt_kernels::sample_without_replacement", mutates_args=())
def _sample_op(weights_GN: torch.Tensor, k: int, seed: int, offset: int, uniform: bool) -> torch.Tensor:
    if use_triton(weights_GN):
        return _launch_sample(weights_GN, k, seed, offset, uniform)
    mode = "uniform" if uniform else "weighted"
    return reference.sample_without_replacement(weights_GN, k, seed=seed, offset=offset, mode=mode)


@_sample_op.register_fake
def _(weights_GN, k, seed, offset, uniform):
    return weights_GN.new_empty((weights_GN.shape[0], k), dtype=torch.int64)


def sample_without_replacement(
    weights_GN: torch.Tensor, k: int, *, seed: int, offset: int = 0, mode: str = "weighted"
) -> torch.Tensor:
    """Draws k of N items per group without replacement (Gumbel-top-k); sorted indices.

    Args:
        weights_GN: [G, N] fp32/bf16/fp16, non-negative, any strides. Zero-weight items are
            drawn only when fewer than k items have positive weight. Unused in ``uniform`` mode
            (only its shape and device matter).
        k: items per group, 1 <= k <= N.
        seed, offset: Python ints; the same (seed, offset, shape, backend) gives the same draw,
            with no host sync. The training loop passes (run seed, step).
        mode: ``weighted`` (probability proportional to the weights) or ``uniform``.

    Returns:
        [G, k] int64, strictly ascending per row. Not differentiable.

    The Triton kernel and the reference use different random streams (Philox in the kernel,
    torch's generator in the reference): each is reproducible, both have the same law.
    """
    reference.check_sampling_args(weights_GN, k, mode)
    return _sample_op(weights_GN, k, seed, offset, mode == "uniform")
