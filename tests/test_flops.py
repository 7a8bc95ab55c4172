"""The FLOP formulas the trainer's TFLOP/s and MFU come from, against torch's FLOP counter, and the
per-card peak table."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from umt_fast.engine import flops
from umt_fast.models.attention import attention_backend
from umt_fast.models.classifier import VideoViT, VideoViTArch


def test_classifier_flops_are_what_its_blocks_compute():
    arch = VideoViTArch(width=64, depth=2, heads=2, num_frames=2, img_size=32, patch_size=16, num_classes=3)
    model = VideoViT(arch)
    video = torch.randn(1, 3, 2, 32, 32)
    with attention_backend("math"), FlopCounterMode(display=False) as counter:
        model(video).sum().backward()
    blocks = sum(sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()
                 if name.rsplit(".", 2)[-2:-1] == ["blocks"])  # fmt: skip
    assert blocks == flops.classifier_flops_per_clip(arch)
    # by hand: 8 tokens, 2 blocks of (8 + 16) * 64^2 + 4 * 8 * 64 per token, forward + backward = 3x
    assert flops.classifier_flops_per_clip(arch) == 3 * 2 * 8 * (24 * 64 * 64 + 4 * 8 * 64)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H200", "fp32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "fp16", 312.0), ("NVIDIA GeForce GTX 1080", "bf16", None)])  # fmt: skip
def test_peak_table(name, precision, peak):
    assert flops.peak_tflops_of(name, precision) == peak


def test_no_peak_on_a_cpu():
    assert flops.peak_tflops(torch.device("cpu"), "bf16") is None
