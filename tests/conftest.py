"""Test-session setup.

Without a GPU, the Triton kernels run in Triton's CPU interpreter. The switch must be set
before umt_kernels (and its @triton.jit functions) are imported; it only matters where a test
selects the ``triton`` backend, since ``auto`` runs the references on the CPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
