"""The FP8 teacher: the quantisation itself (per-output-channel e4m3 weights, per-row dynamic
activation scales) against a float64 restatement; the emulated teacher against the bf16 one
(targets' mean cosine >= 0.999, attention masks overlapping >= 90%) for CLIP and timm families
(EVA's q/v biases included); the refusal off FP8 GPUs; and, on such a GPU, torch._scaled_mm
against the emulation."""
import copy

import pytest
import torch

from umt_fast import interop
from umt_fast.config import build_config
from umt_fast.masking import sample_visible_tokens
from umt_fast.models.fp8 import E4M3_MAX, FP8Linear, check_fp8_device, quantize_rows, quantize_teacher_fp8
from umt_fast.models.teacher import CLIPVisionTeacher, TeacherArch

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value (ties to even), restated on float64: 3 mantissa bits,
    exponents -6..8, subnormals of 2^-9."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0**-6)))
    step = 2.0 ** (exponent - 3)
    return torch.round(x / step) * step  # torch.round: half to even


def test_quantize_rows_is_per_row_e4m3_with_amax_scales():
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [[1e-3], [1.0], [30.0], [1e4], [0.5]], dtype=torch.float64)  # fmt: skip
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    expected_scale = x.abs().amax(1, keepdim=True) / E4M3_MAX
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.double(), _e4m3_round(x / scale.double()), rtol=0, atol=0)
    assert (q.double().abs().amax(1) == E4M3_MAX).all()  # every row's largest value lands on 448


def test_fp8_linear_emulation_is_the_dequantised_product():
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(48, 32)
    x = torch.randn(3, 7, 48, generator=g)
    layer = FP8Linear.from_linear(linear, emulate=True)
    qx, sx = quantize_rows(x.reshape(-1, 48).double())
    qw, sw = quantize_rows(linear.weight.detach().double())
    expected = (qx.double() * sx.double()) @ (qw.double() * sw.double()).t() + linear.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), expected.view(3, 7, 32), rtol=1e-5, atol=1e-5)
    assert (layer(x) - linear(x)).abs().max() < 0.1 * linear(x).abs().max()


def _agreement(teacher, video, P, ratio=0.8):
    """(mean cosine of all targets, mask overlap) of the emulated FP8 teacher against ``teacher``."""
    fp8 = quantize_teacher_fp8(copy.deepcopy(teacher), emulate=True)
    a, b = teacher(video), fp8(video)
    B, T = video.shape[0], video.shape[2]
    idx = torch.arange(T * P).expand(B, -1)
    cos = (a.targets(idx).float() * b.targets(idx).float()).sum(-1).mean().item()
    masks = [sample_visible_tokens("attention", batch_size=B, num_frames=T, patches_per_frame=P, ratio=ratio, seed=0,
                                   offset=0, device=video.device, cls_attn_BTP=out.cls_attn.float())
             for out in (a, b)]  # fmt: skip
    overlap = (masks[0].unsqueeze(-1) == masks[1].unsqueeze(-2)).any(-1).float().mean().item()
    return cos, overlap


def test_emulated_fp8_clip_teacher_agrees_with_bf16():
    torch.manual_seed(0)
    arch = TeacherArch(width=256, layers=6, heads=4, patch_size=16, output_dim=128, input_resolution=112, return_layers=3)
    teacher = CLIPVisionTeacher(arch).to(torch.bfloat16)
    video = torch.randn(2, 3, 4, 112, 112, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    cos, overlap = _agreement(teacher, video, P=49)
    assert cos >= 0.999 and overlap >= 0.9, (cos, overlap)
    assert isinstance(quantize_teacher_fp8(copy.deepcopy(teacher)).transformer.resblocks[0].attn.in_proj, FP8Linear)


# The random DINOv2's bf16 forward is itself only 0.998 from its fp32 one (its tokens after the
# final norm are small differences of large values), so two bf16-rounded versions of it differ by
# bf16's noise, not FP8's: that family is checked against its fp32 forward, the FP8 error alone.
@pytest.mark.parametrize("name, resolution, dtype", [
    ("vit_small_patch14_reg4_dinov2.lvd142m", 56, torch.float32),  # registers
    ("eva02_tiny_patch14_224.mim_in22k", 56, torch.bfloat16),       # RoPE, q/v biases beside the fused qkv
])  # fmt: skip
def test_emulated_fp8_timm_teachers_agree_with_the_unquantised_teacher(name, resolution, dtype):
    torch.manual_seed(0)
    teacher = interop.load_teacher(None, input_resolution=resolution, return_layers=2, arch=f"timm:{name}", depth=4,
                                   init_values=1.0 if "dinov2" in name else None)  # fmt: skip
    teacher = teacher.to(dtype)
    video = torch.randn(2, 3, 2, resolution, resolution, generator=torch.Generator().manual_seed(3)).to(dtype)
    cos, overlap = _agreement(teacher, video, P=(resolution // 14) ** 2, ratio=0.5)
    assert cos >= 0.999 and overlap >= 0.9, (cos, overlap)
    fp8 = quantize_teacher_fp8(copy.deepcopy(teacher), emulate=True)
    linears = [m for m in fp8.modules() if isinstance(m, torch.nn.Linear) and m in set(fp8.compilable_blocks[0].modules())]
    assert not linears  # every block linear is FP8


def test_fp8_is_refused_off_fp8_gpus():
    with pytest.raises(ValueError, match="teacher.precision='fp8' needs an FP8 GPU .* on cpu"):
        check_fp8_device(torch.device("cpu"))
    assert build_config(["--teacher.precision", "fp8"]).teacher.precision == "fp8"


@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or Ada GPU")
def test_scaled_mm_matches_the_emulation_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    linear = torch.nn.Linear(1024, 3072, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 197, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    fast, slow = FP8Linear.from_linear(linear), FP8Linear.from_linear(linear, emulate=True)
    torch.testing.assert_close(fast(x).float(), slow(x).float(), rtol=2e-2, atol=2e-2)
    torch.manual_seed(0)
    arch = TeacherArch(width=1024, layers=4, heads=16, patch_size=14, output_dim=768, input_resolution=196)
    teacher = CLIPVisionTeacher(arch).cuda().to(torch.bfloat16)
    video = torch.randn(2, 3, 4, 196, 196, device="cuda", dtype=torch.bfloat16)
    fp8 = quantize_teacher_fp8(copy.deepcopy(teacher))
    a, b = teacher(video), fp8(video)
    idx = torch.arange(4 * 196, device="cuda").expand(2, -1)
    assert (a.targets(idx).float() * b.targets(idx).float()).sum(-1).mean() >= 0.999
