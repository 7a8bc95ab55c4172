"""Row gathers: ``gather_rows``, the fused ``select_and_gather`` and ``gather_patches``.

Shape legend: G groups, N rows per group, K kept rows, C channels; B clips, T frames,
p patch side, P patches per frame.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from umt_kernels import reference
from umt_kernels._backend import use_triton
from umt_kernels.sampling import _load_key, _sample_keys, _topk_rank, key_arguments, split_offset
from umt_kernels.utils import block_size, num_warps_for

_BLOCK_C = 64


# ----------------------------------------------------------------------------- gather_rows


@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, out_ptr, N, K, C,
    stride_xg, stride_xn, stride_xc, stride_ig, stride_ik,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    group, kb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok, c_ok = ks < K, cs < C
    rows = tl.load(idx_ptr + group * stride_ig + ks * stride_ik, mask=k_ok, other=0)
    mask = k_ok[:, None] & c_ok[None, :]
    vals = tl.load(x_ptr + group * stride_xg + rows[:, None] * stride_xn + cs[None, :] * stride_xc, mask=mask)
    tl.store(out_ptr + (group * K + ks[:, None]) * C + cs[None, :], vals, mask=mask)


def _launch_gather_rows(x_GNC: torch.Tensor, idx_GK: torch.Tensor) -> torch.Tensor:
    G, N, C = x_GNC.shape
    K = idx_GK.shape[1]
    out = torch.empty(G, K, C, device=x_GNC.device, dtype=x_GNC.dtype)
    if out.numel() == 0:
        return out
    BLOCK_K, BLOCK_C = 16, min(_BLOCK_C * 2, block_size(C))
    grid = (G, triton.cdiv(K, BLOCK_K), triton.cdiv(C, BLOCK_C))
    _gather_rows_kernel[grid](
        x_GNC, idx_GK, out, N, K, C, *x_GNC.stride(), *idx_GK.stride(),
        BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C, num_warps=num_warps_for(BLOCK_K * BLOCK_C),
    )
    return out


def _scatter_rows(grad_GKC: torch.Tensor, idx_GK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The adjoint of gather_rows: [G, K, C] -> [G, N, C], summing repeated indices."""
    G, K, C = grad_GKC.shape
    grad_x = grad_GKC.new_zeros(G, num_rows, C)
    return grad_x.scatter_add_(1, idx_GK.unsqueeze(-1).expand(G, K, C), grad_GKC)


@torch.library.custom_op("umt_kernels::gather_rows", mutates_args=())
def _gather_rows_op(x_GNC: torch.Tensor, idx_GK: torch.Tensor) -> torch.Tensor:
    if use_triton(x_GNC):
        return _launch_gather_rows(x_GNC, idx_GK)
    return reference.gather_rows(x_GNC, idx_GK)


@_gather_rows_op.register_fake
def _(x_GNC, idx_GK):
    return x_GNC.new_empty((x_GNC.shape[0], idx_GK.shape[1], x_GNC.shape[2]))


def _gather_rows_setup(ctx, inputs, output):
    x_GNC, idx_GK = inputs
    ctx.save_for_backward(idx_GK)
    ctx.num_rows = x_GNC.shape[1]


def _gather_rows_backward(ctx, grad_GKC):
    (idx_GK,) = ctx.saved_tensors
    return _scatter_rows(grad_GKC, idx_GK, ctx.num_rows), None


_gather_rows_op.register_autograd(_gather_rows_backward, setup_context=_gather_rows_setup)


def _check_gather_args(x_GNC: torch.Tensor, idx_GK: torch.Tensor) -> None:
    if x_GNC.dim() != 3 or idx_GK.dim() != 2 or idx_GK.shape[0] != x_GNC.shape[0]:
        raise ValueError(f"expected x [G, N, C] and idx [G, K], got {tuple(x_GNC.shape)} and {tuple(idx_GK.shape)}")
    if idx_GK.dtype != torch.int64:
        raise ValueError(f"idx must be int64, got {idx_GK.dtype}")


def gather_rows(x_GNC: torch.Tensor, idx_GK: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of every group: ``out[g, j] = x[g, idx[g, j]]``.

    Args:
        x_GNC: [G, N, C] any float dtype, any strides.
        idx_GK: [G, K] int64 in [0, N) (not checked on the device: no host sync).

    Returns:
        [G, K, C] contiguous, x's dtype. Differentiable in x (scatter-add backward).
    """
    _check_gather_args(x_GNC, idx_GK)
    return _gather_rows_op(x_GNC, idx_GK)


# ------------------------------------------------------------------------ select_and_gather


@triton.jit
def _select_and_gather_kernel(
    w_ptr, x_ptr, idx_ptr, out_ptr, N, C, key, key_ptr, row_offset,
    stride_wg, stride_wn, stride_xg, stride_xn, stride_xc,
    K: tl.constexpr, C_PER_PROGRAM: tl.constexpr, KEY_IN_MEMORY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (group, split) selects its group's rows once, then copies channels
    # [split * C_PER_PROGRAM, +C_PER_PROGRAM) of them, BLOCK_K rows x BLOCK_C channels at a time.
    # The selected indices come out as a mask and ranks over the N items; to copy compact
    # [BLOCK_K, BLOCK_C] tiles they go through memory: every program of the group stores the
    # same values to idx (a benign race), and after a CTA barrier reads its own back.
    group, split = tl.program_id(0), tl.program_id(1)
    key = _load_key(key, key_ptr, KEY_IN_MEMORY)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < N
    keys = _sample_keys(w_ptr + group * stride_wg, stride_wn, row_offset + group, cols, valid, N, key, 0)  # weighted
    selected, rank = _topk_rank(keys, valid, K)
    idx_row = idx_ptr + group * K
    tl.store(idx_row + rank, cols.to(tl.int64), mask=selected)
    tl.debug_barrier()
    c_start = split * C_PER_PROGRAM
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        rows = tl.load(idx_row + ks, mask=k_ok, other=0)
        src = x_ptr + group * stride_xg + rows[:, None] * stride_xn
        dst = out_ptr + (group * K + ks[:, None]) * C
        for c0 in range(0, C_PER_PROGRAM, BLOCK_C):
            cs = c_start + c0 + tl.arange(0, BLOCK_C)
            mask = k_ok[:, None] & (cs < C)[None, :]
            tl.store(dst + cs[None, :], tl.load(src + cs[None, :] * stride_xc, mask=mask), mask=mask)


# About this many programs per select_and_gather launch: enough to fill the GPU, few enough that
# the selection (redone by each program of a group) stays small beside the copy.
_TARGET_PROGRAMS = 2048


def _launch_select_and_gather(scores_GN, x_GNC, k, seed, offset, offset_tensor, row_offset):
    G, N, C = x_GNC.shape
    idx = torch.empty(G, k, device=x_GNC.device, dtype=torch.int64)
    out = torch.empty(G, k, C, device=x_GNC.device, dtype=x_GNC.dtype)
    if G == 0:
        return idx, out
    key, key_tensor = key_arguments(seed, offset, offset_tensor)
    BLOCK_N, BLOCK_K, BLOCK_C = block_size(N), min(64, block_size(k)), min(128, block_size(C))
    splits = min(triton.cdiv(C, BLOCK_C), max(1, triton.cdiv(_TARGET_PROGRAMS, G)))
    c_per_program = triton.cdiv(triton.cdiv(C, splits), BLOCK_C) * BLOCK_C
    _select_and_gather_kernel[(G, triton.cdiv(C, c_per_program))](
        scores_GN, x_GNC, idx, out, N, C, key, idx if key_tensor is None else key_tensor, row_offset,
        *scores_GN.stride(), *x_GNC.stride(),
        K=k, C_PER_PROGRAM=c_per_program, KEY_IN_MEMORY=key_tensor is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C,
        num_warps=num_warps_for(max(BLOCK_N, BLOCK_K * BLOCK_C * x_GNC.element_size() // 2)),  # fp32: 2x the warps
    )
    return idx, out


@torch.library.custom_op("umt_kernels::select_and_gather", mutates_args=())
def _select_and_gather_op(
    scores_GN: torch.Tensor,
    x_GNC: torch.Tensor,
    k: int,
    seed: int,
    offset: int,
    offset_tensor: torch.Tensor | None,
    row_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x_GNC):
        return _launch_select_and_gather(scores_GN, x_GNC, k, seed, offset, offset_tensor, row_offset)
    return reference.select_and_gather(
        scores_GN, x_GNC, k, seed=seed, offset=offset if offset_tensor is None else offset_tensor, row_offset=row_offset
    )


@_select_and_gather_op.register_fake
def _(scores_GN, x_GNC, k, seed, offset, offset_tensor, row_offset):
    G, _, C = x_GNC.shape
    return scores_GN.new_empty((G, k), dtype=torch.int64), x_GNC.new_empty((G, k, C))


def _select_setup(ctx, inputs, output):
    ctx.num_rows = inputs[1].shape[1]
    ctx.save_for_backward(output[0])


def _select_backward(ctx, grad_idx, grad_GKC):
    (idx_GK,) = ctx.saved_tensors
    return None, _scatter_rows(grad_GKC, idx_GK, ctx.num_rows), None, None, None, None, None


_select_and_gather_op.register_autograd(_select_backward, setup_context=_select_setup)


def select_and_gather(
    scores_GN: torch.Tensor, x_GNC: torch.Tensor, k: int, *, seed: int, offset: int | torch.Tensor = 0, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples k rows per group in proportion to ``scores`` (without replacement) and gathers
    them, in one launch.

    Args:
        scores_GN: [G, N] non-negative weights (e.g. the teacher's CLS attention).
        x_GNC: [G, N, C] rows to gather, any float dtype and strides.
        k, seed, offset, row_offset: as :func:`umt_kernels.sample_without_replacement`, whose
            indices this returns exactly (``offset`` may be a 0-dim int64 device tensor).

    Returns:
        (idx_GK [G, k] int64 ascending, x_GKC [G, k, C] in x's dtype). x_GKC is
        differentiable in x: the backward scatters the gradient into the selected rows.
    """
    reference.check_sampling_args(scores_GN, k, "weighted")
    if x_GNC.dim() != 3 or x_GNC.shape[:2] != scores_GN.shape:
        raise ValueError(f"x must be [G, N, C] matching scores [G, N], got {tuple(x_GNC.shape)} and {tuple(scores_GN.shape)}")
    offset, offset_tensor = split_offset(offset, scores_GN.device)
    return _select_and_gather_op(scores_GN, x_GNC, k, seed, offset, offset_tensor, row_offset)


# --------------------------------------------------------------------------- gather_patches


@triton.jit
def _gather_patches_kernel(
    video_ptr, idx_ptr, out_ptr, K, grid_w, patches_per_frame,
    stride_vb, stride_vc, stride_vt, stride_vh, stride_vw, stride_ib, stride_ik,
    CHANNELS: tl.constexpr, PATCH: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, kb = tl.program_id(0), tl.program_id(1)
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    token = tl.load(idx_ptr + b * stride_ib + ks * stride_ik, mask=k_ok, other=0)
    t = token // patches_per_frame
    rest = token % patches_per_frame
    y0 = (rest // grid_w) * PATCH
    x0 = (rest % grid_w) * PATCH
    pix = tl.arange(0, PATCH * PATCH)
    py, px = pix // PATCH, pix % PATCH
    src = (video_ptr + b * stride_vb + t[:, None] * stride_vt
           + (y0[:, None] + py[None, :]) * stride_vh + (x0[:, None] + px[None, :]) * stride_vw)
    row = CHANNELS * PATCH * PATCH
    dst = out_ptr + (b * K + ks[:, None]) * row + pix[None, :]
    mask = k_ok[:, None]
    for c in tl.static_range(CHANNELS):
        vals = tl.load(src + c * stride_vc, mask=mask)
        tl.store(dst + c * PATCH * PATCH, vals, mask=mask)


def _launch_gather_patches(video_BCTHW: torch.Tensor, idx_BK: torch.Tensor, patch: int) -> torch.Tensor:
    B, C, T, H, W = video_BCTHW.shape
    K = idx_BK.shape[1]
    out = torch.empty(B, K, C * patch * patch, device=video_BCTHW.device, dtype=video_BCTHW.dtype)
    if out.numel() == 0:
        return out
    BLOCK_K = 16
    _gather_patches_kernel[(B, triton.cdiv(K, BLOCK_K))](
        video_BCTHW, idx_BK, out, K, W // patch, (H // patch) * (W // patch),
        *video_BCTHW.stride(), *idx_BK.stride(),
        CHANNELS=C, PATCH=patch, BLOCK_K=BLOCK_K, num_warps=num_warps_for(BLOCK_K * patch * patch),
    )
    return out


def _scatter_patches(grad_BKD: torch.Tensor, idx_BK: torch.Tensor, video_shape, patch: int) -> torch.Tensor:
    """The adjoint of gather_patches: zeros everywhere but the kept patches."""
    B, C, T, H, W = video_shape
    gh, gw = H // patch, W // patch
    patches = _scatter_rows(grad_BKD, idx_BK, T * gh * gw)
    return patches.view(B, T, gh, gw, C, patch, patch).permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, T, H, W)


@torch.library.custom_op("umt_kernels::gather_patches", mutates_args=())
def _gather_patches_op(video_BCTHW: torch.Tensor, idx_BK: torch.Tensor, patch: int) -> torch.Tensor:
    if use_triton(video_BCTHW) and (patch & (patch - 1)) == 0:
        return _launch_gather_patches(video_BCTHW, idx_BK, patch)
    return reference.gather_patches(video_BCTHW, idx_BK, patch)


@_gather_patches_op.register_fake
def _(video_BCTHW, idx_BK, patch):
    B, C = video_BCTHW.shape[:2]
    return video_BCTHW.new_empty((B, idx_BK.shape[1], C * patch * patch))


def _patches_setup(ctx, inputs, output):
    video, idx, patch = inputs
    ctx.save_for_backward(idx)
    ctx.video_shape, ctx.patch = tuple(video.shape), patch


def _patches_backward(ctx, grad_BKD):
    (idx,) = ctx.saved_tensors
    return _scatter_patches(grad_BKD, idx, ctx.video_shape, ctx.patch), None, None


_gather_patches_op.register_autograd(_patches_backward, setup_context=_patches_setup)


def gather_patches(video_BCTHW: torch.Tensor, idx_BK: torch.Tensor, patch: int) -> torch.Tensor:
    """Raw pixels of only the kept patches: im2col restricted to the visible set.

    Args:
        video_BCTHW: [B, C, T, H, W] any dtype and strides, H and W divisible by ``patch``.
        idx_BK: [B, K] int64 token indices ``t * P + (h * W/p + w)``.
        patch: patch side p (tubelet size 1). The Triton kernel needs p to be a power of two
            (16 in every UMT model); other sizes run the reference.

    Returns:
        [B, K, C*p*p] in video's dtype, each row in (c, y, x) order: the layout of a
        Conv3d(kernel=(1, p, p)) weight flattened to [C_out, C*p*p], so
        ``F.linear(patches, conv.weight.flatten(1), conv.bias)`` is the patch embedding of
        the kept tokens. Differentiable in the video.
    """
    if video_BCTHW.dim() != 5 or idx_BK.dim() != 2 or idx_BK.shape[0] != video_BCTHW.shape[0]:
        raise ValueError(f"expected video [B, C, T, H, W] and idx [B, K], got {tuple(video_BCTHW.shape)} and {tuple(idx_BK.shape)}")
    H, W = video_BCTHW.shape[-2:]
    if H % patch or W % patch:
        raise ValueError(f"frame size {H}x{W} is not divisible by patch size {patch}")
    return _gather_patches_op(video_BCTHW, idx_BK, patch)
