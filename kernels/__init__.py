"""umt_kernels: token-selection and gather ops for masked video models.

Depends on torch (and, for the fused paths, triton) only. Every public op has a
plain-PyTorch reference of the same signature in :mod:`umt_kernels.reference`.
"""
from umt_kernels.reference import (
    alignment_loss,
    cls_attention,
    gather_patches,
    gather_rows,
    sample_without_replacement,
    select_and_gather,
)

__all__ = [
    "alignment_loss",
    "cls_attention",
    "gather_patches",
    "gather_rows",
    "sample_without_replacement",
    "select_and_gather",
]
