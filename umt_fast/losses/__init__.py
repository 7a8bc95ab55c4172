"""Training losses."""
from __future__ import annotations

import torch

import umt_kernels


def alignment_loss(student_out: torch.Tensor, teacher_targets: torch.Tensor) -> torch.Tensor:
    """UMT's unmasked-token alignment loss.

    Args:
        student_out: [L, B, N, Ct] the student's L2-normalised head outputs.
        teacher_targets: [L, B, N, Ct] the teacher's L2-normalised targets, same order.

    Returns:
        0-dim float32: mean over layers, clips and visible tokens of 2 - 2 cos(s, t).
    """
    if student_out.shape != teacher_targets.shape:
        raise ValueError(
            f"student output {tuple(student_out.shape)} and teacher targets "
            f"{tuple(teacher_targets.shape)} must have the same [L, B, N, Ct] shape"
        )
    return umt_kernels.alignment_loss(student_out, teacher_targets)
