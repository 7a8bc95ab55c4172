"""umt_kernels: token-selection and gather ops for masked video models.

Depends on torch and triton only. Every op is a ``torch.library`` custom op (so
torch.compile(fullgraph=True) and CUDA graphs see one node), runs a Triton kernel on CUDA
and the plain-PyTorch reference of the same signature (:mod:`umt_kernels.reference`)
elsewhere; :func:`set_backend` / :func:`backend` choose explicitly.
"""
from umt_kernels._backend import backend, get_backend, set_backend
from umt_kernels.alignment_loss import alignment_loss
from umt_kernels.cls_attention import cls_attention
from umt_kernels.gather import gather_patches, gather_rows, select_and_gather
from umt_kernels.sampling import sample_without_replacement

__all__ = [
    "alignment_loss",
    "backend",
    "cls_attention",
    "gather_patches",
    "gather_rows",
    "get_backend",
    "sample_without_replacement",
    "select_and_gather",
    "set_backend",
]
