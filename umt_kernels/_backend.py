"""Chooses between the Triton kernels and the plain-PyTorch references.

``auto`` (the default): Triton for CUDA tensors when triton is installed, the reference
otherwise. ``triton`` forces the kernels: on CUDA, or on the CPU under the Triton interpreter
(``TRITON_INTERPRET=1`` set before importing this package), and an error elsewhere.
``reference`` forces the references (for baselines and debugging). The environment variable
``UMT_KERNELS_BACKEND`` sets the starting value.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("UMT_KERNELS_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"UMT_KERNELS_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Selects ``auto``, ``triton`` or ``reference`` for every umt_kernels op."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of :func:`set_backend`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_can_run(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRET))


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernel (raises if forced but impossible)."""
    if _backend == "reference":
        return False
    if _backend == "auto":
        return HAS_TRITON and tensor.device.type == "cuda"
    can_run = triton_can_run(tensor.device)
    if not can_run:
        raise RuntimeError(
            f"umt_kernels backend 'triton' cannot run on {tensor.device}: "
            + ("triton is not installed" if not HAS_TRITON else "set TRITON_INTERPRET=1 before importing umt_kernels to run on the CPU")
        )
    return True
