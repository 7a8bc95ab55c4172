"""Skip marks shared by test files."""
import pytest
import torch
from torch.torch_version import TorchVersion

from umt_fast.engine.distributed import FSDP_ON_CPU_MIN_TORCH

needs_fsdp_on_cpu = pytest.mark.skipif(
    TorchVersion(torch.__version__) < FSDP_ON_CPU_MIN_TORCH,
    reason=f"FSDP2 over gloo averages gradients from torch {'.'.join(map(str, FSDP_ON_CPU_MIN_TORCH))} on "
    "(umt_fast refuses it before)",
)
