"""Model FLOPs of a step, and the peak of the card they ran on, for TFLOP/s and MFU.

Model FLOPs count the matrix multiplies of the ViT and BERT blocks (2 FLOPs per multiply-add;
the backward pass is twice the forward), not what recomputation or padding adds: the
convention of PaLM's MFU and of torchtitan. LayerNorms, softmaxes, heads and losses are left
out (under 1% at the published sizes).
"""
from __future__ import annotations

import torch

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, by the device name's marker (first match wins).
# fp32 runs use TF32, half of these.
PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
)


def transformer_forward_flops(tokens: int, seq: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of `depth` pre-norm blocks over `tokens` tokens in sequences of `seq`:
    QKV + output projections (8 w^2), the MLP (4 * mlp_ratio * w^2) and attention's two
    [seq x seq] products (4 seq w), per token."""
    return depth * tokens * ((8 + 4 * mlp_ratio) * width * width + 4 * seq * width)


def pretrain_flops_per_clip(teacher_arch, student_arch, teacher_grid: int, num_visible: int,
                            num_frames: int | None = None, with_student: bool = True) -> float:  # fmt: skip
    """Stage 1, one clip: the frozen teacher's forward on every frame (CLS included) + the
    student's forward and backward (3x) on the visible tokens. UMT-L: ~1.0 + ~0.6 TFLOP.
    ``num_frames``: the clip's frames (default: the student's; stage 2's images have one).
    ``with_student=False``: the teacher's part alone (a further teacher of the same student)."""
    T, P = num_frames or student_arch.num_frames, teacher_grid**2
    teacher = transformer_forward_flops(T * (P + 1), P + 1, teacher_arch.width, teacher_arch.layers)
    if not with_student:
        return teacher
    student = 3 * transformer_forward_flops(num_visible, num_visible, student_arch.width, student_arch.depth,
                                            student_arch.mlp_ratio)  # fmt: skip
    return teacher + student


def text_flops_per_pair(text_arch, seq_len: int) -> float:
    """Stage 2's text tower, one pair, forward and backward (3x): the caption through every layer
    twice (VTC, MLM) and the fusion layers three times (VTM: the positive and two negatives).
    Cross-attention is counted as self-attention over the caption."""
    full = transformer_forward_flops(seq_len, seq_len, text_arch.hidden, text_arch.num_layers)
    fusion = transformer_forward_flops(seq_len, seq_len, text_arch.hidden, text_arch.fusion_layers)
    return 3 * (2 * full + 3 * fusion)


def classifier_flops_per_clip(arch) -> float:
    """Fine-tuning, one clip: the dense ViT's forward and backward over all T x grid^2 tokens."""
    return 3 * transformer_forward_flops(arch.num_tokens, arch.num_tokens, arch.width, arch.depth, arch.mlp_ratio)


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The card's dense peak for the run's precision; None on a CPU or an unknown card."""
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device), precision)


def peak_tflops_of(device_name: str, precision: str) -> float | None:
    """The dense peak of the card called `device_name` (torch.cuda.get_device_name) for `precision`."""
    name = device_name
    for marker, bf16 in PEAK_BF16_TFLOPS:
        if marker in name:
            return bf16 if precision in ("bf16", "fp16") else bf16 / 2
    return None
