"""Heads-averaged attention of one query (the CLS token) over N keys, without an N x N matrix."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from umt_kernels import reference
from umt_kernels._backend import use_triton
from umt_kernels.utils import block_size, num_warps_for


@triton.jit
def _cls_attention_kernel(
    q_ptr, k_ptr, out_ptr, N, D, scale,
    stride_qg, stride_qh, stride_qd, stride_kg, stride_kh, stride_kn, stride_kd,
    H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    group = tl.program_id(0)
    ns, ds = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    n_ok, d_ok = ns < N, ds < D
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h in range(H):
        q = tl.load(q_ptr + group * stride_qg + h * stride_qh + ds * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        k = tl.load(
            k_ptr + group * stride_kg + h * stride_kh + ns[:, None] * stride_kn + ds[None, :] * stride_kd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(tl.float32)
        logits = tl.where(n_ok, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        acc += p / tl.sum(p, axis=0)
    tl.store(out_ptr + group * N + ns, acc / H, mask=n_ok)


def _launch(q_GHD: torch.Tensor, k_GHND: torch.Tensor, scale: float) -> torch.Tensor:
    G, H, N, D = k_GHND.shape
    out = torch.empty(G, N, device=k_GHND.device, dtype=torch.float32)
    if G == 0:
        return out
    BLOCK_N, BLOCK_D = block_size(N), block_size(D)
    _cls_attention_kernel[(G,)](
        q_GHD, k_GHND, out, N, D, scale, *q_GHD.stride(), *k_GHND.stride(),
        H=H, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps_for(BLOCK_N * BLOCK_D),
    )
    return out


@torch.library.custom_op("umt_kernels::cls_attention", mutates_args=())
def _cls_attention_op(q_cls_GHD: torch.Tensor, k_GHND: torch.Tensor, scale: float) -> torch.Tensor:
    if k_GHND.dtype != torch.float64 and use_triton(k_GHND):
        return _launch(q_cls_GHD, k_GHND, scale)
    return reference.cls_attention(q_cls_GHD, k_GHND, scale)


@_cls_attention_op.register_fake
def _(q_cls_GHD, k_GHND, scale):
    return k_GHND.new_empty((k_GHND.shape[0], k_GHND.shape[2]), dtype=reference.compute_dtype(k_GHND))


def _setup(ctx, inputs, output):
    q, k, scale = inputs
    ctx.save_for_backward(q, k)
    ctx.scale = scale


def _backward(ctx, grad_GN):
    # Rarely needed (the teacher is frozen): differentiate the reference formula.
    q, k = ctx.saved_tensors
    with torch.enable_grad():
        q_, k_ = q.detach().requires_grad_(), k.detach().requires_grad_()
        out = reference.cls_attention(q_, k_, ctx.scale)
        grad_q, grad_k = torch.autograd.grad(out, (q_, k_), grad_GN)
    return grad_q, grad_k, None


_cls_attention_op.register_autograd(_backward, setup_context=_setup)


def cls_attention(q_cls_GHD: torch.Tensor, k_GHND: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over N of ``scale * <q_cls, k_n>``, averaged over heads.

    Args:
        q_cls_GHD: [G, H, D] the CLS query of each group (e.g. frame), unscaled; any float
            dtype and strides (a slice ``q[:, :, 0]`` of a [G, H, N, D] tensor works as is).
        k_GHND: [G, H, N, D] the keys, CLS included; same dtype family, any strides.
        scale: the logit scale, usually D ** -0.5.

    Returns:
        [G, N] float32; each row sums to 1. Computed in fp32 whatever the 16/32-bit input
        dtype, one [N, D] tile per head (float64 inputs run the reference in float64). Differentiable (the backward differentiates the reference).
    """
    if q_cls_GHD.dim() != 3 or k_GHND.dim() != 4 or k_GHND.shape[:2] != q_cls_GHD.shape[:2] \
            or k_GHND.shape[3] != q_cls_GHD.shape[2]:
        raise ValueError(f"expected q [G, H, D] and k [G, H, N, D], got {tuple(q_cls_GHD.shape)} and {tuple(k_GHND.shape)}")
    return _cls_attention_op(q_cls_GHD, k_GHND, float(scale))
