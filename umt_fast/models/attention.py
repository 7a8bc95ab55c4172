"""The one place that computes multi-head attention, for teacher and student alike.

Backends (``--train.attention``):
    auto           PyTorch SDPA, letting it choose (cuDNN on Hopper, flash on Ampere, a fused
                   kernel on CPU).
    sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math
                   SDPA restricted to one of its kernels (an error if that kernel cannot run).
    flash_attn_4   FlashAttention-4 (``pip install flash-attn-4``; CUDA, bf16/fp16, SM80+).
    math           explicit softmax(q k^T / sqrt(D)) v in fp32: slow, for checking the others.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn_4", "math")
_SDPA_KERNELS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
_backend = "auto"


def flash_attn_4_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None \
        and importlib.util.find_spec("flash_attn.cute") is not None


def set_attention_backend(name: str) -> None:
    """Selects the backend of every attention call in the process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "flash_attn_4" and not flash_attn_4_available():
        raise ValueError("attention backend 'flash_attn_4' needs a GPU and `pip install flash-attn-4`")
    _backend = name


def get_attention_backend() -> str:
    return _backend


@contextlib.contextmanager
def attention_backend(name: str):
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    attn = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return (attn @ v.float()).to(q.dtype)


def _flash_attn_4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def multi_head_attention(q_BHND: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, without a mask, through the selected backend.

    Args:
        q_BHND, k_BHND, v_BHND: [B, H, N, D] in one dtype.

    Returns:
        [B, H, N, D] in the input dtype.
    """
    if _backend == "auto":
        return F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND)
    if _backend == "math":
        return _math_attention(q_BHND, k_BHND, v_BHND)
    if _backend == "flash_attn_4":
        return _flash_attn_4(q_BHND, k_BHND, v_BHND)
    with sdpa_kernel(_SDPA_KERNELS[_backend]):
        return F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND)
