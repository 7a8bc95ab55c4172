"""The FP8 teacher (``--teacher.precision fp8``): the frozen teacher's block linears in float8.

The teacher is about 62% of a UMT-L step's FLOPs and never trains, so its weights are quantised
once, when it is built: e4m3 with one scale per output channel (amax / 448). Activations are
quantised on the fly, one scale per row (token). On a Hopper or Ada GPU the product is
``torch._scaled_mm`` with those row- and column-wise scales, accumulating in fp32 and writing
bf16. Everything else stays as it was: LayerNorm, softmax, the CLS attention
(`umt_kernels.cls_attention`), the patch embedding, the final norm and the projection.

``emulate=True`` runs the same quantisation with fp32 matmuls of the dequantised values: the
numerics of the GPU path (up to the accumulation order) on any device, which the CPU tests
check against the unquantised teacher.
"""
from __future__ import annotations

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_CAPABILITY = (8, 9)
"""Ada (sm_89) and Hopper (sm_90) and later have FP8 tensor cores."""


def check_fp8_device(device: torch.device) -> None:
    """ValueError unless ``device`` is a CUDA GPU with FP8 tensor cores."""
    if device.type != "cuda":
        raise ValueError(f"teacher.precision='fp8' needs an FP8 GPU (Hopper or Ada), but the run is on {device.type}; "
                         "use --teacher.precision auto")  # fmt: skip
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"teacher.precision='fp8' needs a GPU with FP8 tensor cores (Hopper or Ada, compute capability "
                         f">= 8.9); {name} is {capability[0]}.{capability[1]}; use --teacher.precision auto")  # fmt: skip


def teachers_at_precision(teachers: list[nn.Module], precision: str, device: torch.device) -> list[nn.Module]:
    """``teacher.precision``: the teachers as they are for ``auto``; for ``fp8``, quantised (after a
    check of the device)."""
    if precision != "fp8":
        return teachers
    check_fp8_device(device)
    return [quantize_teacher_fp8(t) for t in teachers]


def quantize_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], fp32 scales [M, 1]) with x ~ q * scale, one scale per row."""
    amax = x_MK.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x_MK.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class FP8Linear(nn.Module):
    """A frozen linear layer y = x W^T + b with W in e4m3 (per-output-channel scales) and x
    quantised per row at every call.

    Buffers: ``weight_fp8`` [N, K] e4m3, ``weight_scale`` [N, 1] fp32, ``bias`` [N] (or None)
    in the dtype the teacher ran in. ``emulate``: fp32 matmuls of the dequantised values
    instead of ``torch._scaled_mm``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, emulate: bool = False):
        super().__init__()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = weight.shape
        self.emulate = emulate

    @classmethod
    def from_linear(cls, linear: nn.Linear, emulate: bool = False) -> "FP8Linear":
        return cls(linear.weight, linear.bias, emulate)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, emulate={self.emulate}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., K] -> [..., N] in x's dtype."""
        shape, dtype = x.shape, x.dtype
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        if self.emulate or not x.is_cuda:
            w = self.weight_fp8.float() * self.weight_scale
            out = (q.float() * scale) @ w.t()
        else:  # per-row x per-column scales, fp32 accumulation; the weight is [K, N] column-major
            out = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale.t(),
                                   out_dtype=torch.bfloat16)  # fmt: skip
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(dtype).view(*shape[:-1], self.out_features)


def _fold_qkv_bias(attn: nn.Module) -> None:
    """timm's EVA attention with q_bias / v_bias calls F.linear on ``qkv.weight`` itself: its
    biases go into the qkv layer, so that the layer's forward (FP8 below) is what runs."""
    if getattr(attn, "q_bias", None) is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        return
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach()
    qkv = nn.Linear(attn.qkv.in_features, attn.qkv.out_features, bias=True, device=bias.device, dtype=bias.dtype)
    qkv.weight = attn.qkv.weight
    qkv.bias = nn.Parameter(bias, requires_grad=False)
    attn.qkv = qkv
    for name in ("q_bias", "k_bias", "v_bias"):
        delattr(attn, name)
        setattr(attn, name, None)
    attn.qkv_bias_separate = False


def quantize_teacher_fp8(teacher: nn.Module, emulate: bool = False) -> nn.Module:
    """In place: every linear layer inside the teacher's blocks (``teacher.compilable_blocks``)
    becomes an `FP8Linear`, CLIP's fused in_proj included; returns the teacher. Quantise after
    moving the teacher to its device and dtype: ``Module.to(dtype)`` would cast the e4m3 weights."""
    from umt_fast.models.teacher import CLIPAttention

    for block in teacher.compilable_blocks:
        for module in list(block.modules()):
            if isinstance(module, CLIPAttention):
                module.in_proj = FP8Linear(module.in_proj_weight, module.in_proj_bias, emulate)
                del module.in_proj_weight, module.in_proj_bias
            _fold_qkv_bias(module)
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, FP8Linear.from_linear(child, emulate))
    teacher.precision = "fp8"
    return teacher
