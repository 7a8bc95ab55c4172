"""UMT's alignment loss, mean over rows of 2 - 2 cos(s, t), fused: one pass forward, one back.

Both inputs are normalised inside (``x / max(|x|, 1e-12)``, as F.normalize), so the value is
a true cosine distance even for inputs that are not unit vectors. Accumulation is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from umt_kernels import reference
from umt_kernels._backend import use_triton
from umt_kernels.utils import block_size, num_warps_for

_EPS = 1e-12


@triton.jit
def _row_stats(s_ptr, t_ptr, rows, cs, C, EPS: tl.constexpr):
    mask = (rows[:, None] >= 0) & (cs < C)[None, :]
    s = tl.load(s_ptr + rows[:, None] * C + cs[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * C + cs[None, :], mask=mask, other=0.0).to(tl.float32)
    s_norm = tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), EPS)
    t_norm = tl.maximum(tl.sqrt(tl.sum(t * t, axis=1)), EPS)
    cos = tl.sum(s * t, axis=1) / (s_norm * t_norm)
    return s, t, s_norm, t_norm, cos


@triton.jit
def _forward_kernel(s_ptr, t_ptr, partial_ptr, R, C, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.where(rows < R, rows, -1)
    _, _, _, _, cos = _row_stats(s_ptr, t_ptr, rows, tl.arange(0, BLOCK_C), C, EPS)
    tl.store(partial_ptr + pid, tl.sum(tl.where(rows >= 0, 2.0 - 2.0 * cos, 0.0), axis=0))


@triton.jit
def _backward_kernel(
    s_ptr, t_ptr, grad_ptr, grad_s_ptr, grad_t_ptr, R, C,
    EPS: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # d(2 - 2 cos)/ds = -2 (t_hat - cos * s_hat) / |s|, scaled by the upstream grad / R.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.where(rows < R, rows, -1)
    cs = tl.arange(0, BLOCK_C)
    s, t, s_norm, t_norm, cos = _row_stats(s_ptr, t_ptr, rows, cs, C, EPS)
    coef = -2.0 * tl.load(grad_ptr).to(tl.float32) / R
    s_hat, t_hat = s / s_norm[:, None], t / t_norm[:, None]
    mask = (rows[:, None] >= 0) & (cs < C)[None, :]
    offsets = rows[:, None] * C + cs[None, :]
    if NEED_S:
        grad_s = coef * (t_hat - cos[:, None] * s_hat) / s_norm[:, None]
        tl.store(grad_s_ptr + offsets, grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
    if NEED_T:
        grad_t = coef * (s_hat - cos[:, None] * t_hat) / t_norm[:, None]
        tl.store(grad_t_ptr + offsets, grad_t.to(grad_t_ptr.dtype.element_ty), mask=mask)


def _launch_config(R: int, C: int) -> tuple[int, int, int]:
    BLOCK_C = block_size(C)
    BLOCK_R = max(1, min(16, 4096 // BLOCK_C))
    return BLOCK_R, BLOCK_C, num_warps_for(BLOCK_R * BLOCK_C)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@torch.library.custom_op("umt_kernels::alignment_loss", mutates_args=())
def _loss_op(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if student.dtype == torch.float64 or not use_triton(student):
        return reference.alignment_loss(student, teacher)
    s, t = _rows(student), _rows(teacher)
    R, C = s.shape
    BLOCK_R, BLOCK_C, num_warps = _launch_config(R, C)
    partial = torch.empty(triton.cdiv(R, BLOCK_R), device=s.device, dtype=torch.float32)
    _forward_kernel[(partial.numel(),)](s, t, partial, R, C, EPS=_EPS, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return partial.sum() / R


@_loss_op.register_fake
def _(student, teacher):
    return student.new_empty((), dtype=reference.compute_dtype(student))


@torch.library.custom_op("umt_kernels::alignment_loss_backward", mutates_args=())
def _loss_backward_op(
    grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, need_s: bool, need_t: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if student.dtype == torch.float64 or not use_triton(student):
        return reference.alignment_loss_backward(grad, student, teacher)
    s, t = _rows(student), _rows(teacher)
    R, C = s.shape
    grad_s, grad_t = torch.empty_like(s), torch.empty_like(t)
    BLOCK_R, BLOCK_C, num_warps = _launch_config(R, C)
    _backward_kernel[(triton.cdiv(R, BLOCK_R),)](
        s, t, grad, grad_s, grad_t, R, C, EPS=_EPS, NEED_S=need_s, NEED_T=need_t,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return grad_s.view(student.shape), grad_t.view(teacher.shape)


@_loss_backward_op.register_fake
def _(grad, student, teacher, need_s, need_t):
    return torch.empty_like(student), torch.empty_like(teacher)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    student, teacher = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad
    grad_s, grad_t = _loss_backward_op(grad, student, teacher, need_s, need_t)
    return (grad_s if need_s else None), (grad_t if need_t else None)


_loss_op.register_autograd(_backward, setup_context=_setup)


def alignment_loss(student_KBNC: torch.Tensor, teacher_KBNC: torch.Tensor) -> torch.Tensor:
    """Mean over all leading dims (K layers, B clips, N tokens) of 2 - 2 cos(s, t).

    Args:
        student_KBNC, teacher_KBNC: [..., C] of the same shape, fp32 or bf16/fp16 (non-contiguous
            inputs are copied once).

    Returns:
        0-dim float32 (float64 inputs run the reference in float64). Differentiable in both inputs (gradients in the inputs' dtypes).
    """
    if student_KBNC.shape != teacher_KBNC.shape:
        raise ValueError(f"student {tuple(student_KBNC.shape)} and teacher {tuple(teacher_KBNC.shape)} shapes differ")
    if student_KBNC.numel() == 0:
        raise ValueError("alignment_loss of empty tensors")
    return _loss_op(student_KBNC, teacher_KBNC)
