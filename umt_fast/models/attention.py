"""The one place that computes multi-head attention for teacher and student.

Everything goes through :func:`torch.nn.functional.scaled_dot_product_attention`, which
picks cuDNN / flash / memory-efficient kernels on the GPU and a fused math kernel on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_head_attention(q_BHND: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, without a mask.

    Args:
        q_BHND, k_BHND, v_BHND: [B, H, N, D] in one dtype.

    Returns:
        [B, H, N, D] in the input dtype.
    """
    return F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND)
